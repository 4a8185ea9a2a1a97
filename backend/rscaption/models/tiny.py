"""Tiny random captioners: real architectures at toy sizes, built in well under a second.

They exist so that tests (here and in the pipeline/plugin/training suites) and `make demo` can run
the whole stack offline before a trained default model exists. Their captions are nonsense made of
remote-sensing words; their embeddings are deterministic for a given seed.
"""

from __future__ import annotations

import torch

from .captioner import Captioner
from .encoders import HFClipEncoder, LitEncoder, OpenClipEncoder, make_preprocess
from .mapping import build_mapping
from .tiny_names import tiny_name

EOS = "<|endoftext|>"

CORPUS = [
    "many buildings and some green trees are around a parking lot.",
    "a river with a bridge passes through the dense forest.",
    "several white storage tanks are next to a road.",
    "an airplane is parked at the airport near the runway.",
    "a baseball field is surrounded by houses and trees.",
    "the farmland is divided into rectangular fields of different colors.",
    "a harbor with many boats docked in the blue sea.",
    "a highway crosses the residential area with roads and cars.",
    "a playground with a green football field and a red track.",
    "some ships are in the port near the industrial area.",
    "bare land with a few sparse shrubs and a dirt road.",
    "a large church is located in the center of the dense residential area.",
    "a golf course with green grass, ponds and sand bunkers.",
    "the beach is next to the ocean with white waves.",
    "a desert with yellow sand dunes.",
    "a viaduct over the river between two mountains.",
]

TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_bpe_tokenizer(vocab_size: int = 400, clip_style: bool = False):
    """GPT-2-style byte-level BPE trained on CORPUS, wrapped as a transformers fast tokenizer.
    `clip_style` adds BOS/EOS around every text (what a CLIP text tower pools on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, "<|startoftext|>"] if clip_style else [EOS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    kwargs = {"eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    if clip_style:
        bos = tok.token_to_id("<|startoftext|>")
        eos = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), (EOS, eos)])
        kwargs["bos_token"] = "<|startoftext|>"
    else:
        kwargs["bos_token"] = EOS
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **kwargs)


def tiny_gpt2(vocab_size: int, eos_id: int, prefix_length: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64 + prefix_length, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return GPT2LMHeadModel(cfg).eval()


def tiny_wordpiece_bert(seed: int = 0):
    """A 2-layer BERT + WordPiece tokenizer standing in for MiniLM in lit tests."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w.strip(".,") for s in CORPUS for w in s.split()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=64)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval(), tokenizer


def tiny_encoder(kind: str = "open_clip", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "open_clip":
        return OpenClipEncoder.from_config(TINY_OPEN_CLIP_CFG)
    if kind == "hf_clip":
        from transformers import CLIPConfig, CLIPModel

        tok = tiny_bpe_tokenizer(clip_style=True)
        cfg = CLIPConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=32)
        torch.manual_seed(seed)
        return HFClipEncoder(CLIPModel(cfg).eval(), tok, make_preprocess(32), name="tiny-hf-clip")
    if kind == "lit":
        import timm

        bert, tok = tiny_wordpiece_bert(seed)
        torch.manual_seed(seed)
        image_tower = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
        return LitEncoder(image_tower, bert, tok, embed_dim=32, image_size=64,
                          text_source={"source": "checkpoint", "path": "text_tower"}).eval()
    raise ValueError(f"unknown tiny encoder kind '{kind}' (open_clip, hf_clip, lit)")


def build_tiny_captioner(kind: str = "open_clip", mapping: str = "mlp", seed: int = 0,
                         prefix_length: int = 4) -> Captioner:
    encoder = tiny_encoder(kind, seed)
    tokenizer = tiny_bpe_tokenizer()
    lm = tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, prefix_length, seed)
    mcfg = {"kind": mapping, "embed_dim": encoder.embed_dim, "lm_hidden": lm.config.n_embd,
            "prefix_length": prefix_length}
    if mapping == "transformer":
        mcfg.update(num_layers=1, num_heads=4)
    torch.manual_seed(seed)
    card = {"description": f"tiny random {kind} captioner for tests and demos (captions are meaningless)",
            "lm": "tiny-gpt2", "tile_size": 256, "ground_resolution_m": None, "trained_on": None}
    name = tiny_name(kind, mapping, seed) if prefix_length == 4 else f"tiny-{kind}-{mapping}-p{prefix_length}"
    return Captioner(encoder, build_mapping(mcfg), lm, tokenizer, card=card, model_id=name)
