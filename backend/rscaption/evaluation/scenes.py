"""Scene names read off a caption by keywords, in English and Chinese.

Sydney-Captions has no scene labels in its files, and a generated caption has none either; what
the cross-lingual check needs is whether two captions (an English and a Chinese one) talk about
the same kind of place. The scene a caption names is the one whose keyword appears *first*:
captions open with their subject ("an industrial area ... and a lawn beside"), and the Chinese
translations keep that order ("一个工业区，...旁边是一个草坪"), so first mention beats any fixed
priority between classes. Tables follow the seven Sydney classes and the words (typos included)
that the Sydney train text uses for them.
"""

from __future__ import annotations

import re

SCENES = ("residential", "airport", "meadow", "river", "ocean", "industrial", "runway")

EN_KEYWORDS = {
    "residential": ["residential", "residentail", "houses", "house", "town", "homes", "villas"],
    "airport": ["airport", "airplanes", "airplane", "planes", "plane", "aircraft", "terminal"],
    "meadow": ["meadow", "meadows", "grassland", "grasslands", "lawn", "lawns", "bushes", "bunkers", "grass"],
    "river": ["river", "rivers", "stream"],
    "ocean": ["ocean", "sea", "seas", "waves"],
    "industrial": ["industrial", "industrail", "factory", "factories", "warehouses", "warehouse", "containers"],
    "runway": ["runway", "runways", "ruwnays", "runaway"],
}

ZH_KEYWORDS = {
    "residential": ["住宅", "居民", "民居", "房屋", "房子", "小镇", "城镇", "别墅"],
    "airport": ["机场", "飞机", "航站"],
    "meadow": ["草地", "草坪", "草原", "草丛", "灌木", "掩体"],
    "river": ["河"],
    "ocean": ["海"],
    "industrial": ["工业", "厂房", "工厂", "仓库", "集装箱"],
    "runway": ["跑道"],
}

_EN_RE = re.compile(r"\b(" + "|".join(sorted({w for ws in EN_KEYWORDS.values() for w in ws}, key=len, reverse=True))
                    + r")\b")
_EN_WORD = {w: s for s, ws in EN_KEYWORDS.items() for w in ws}
_ZH_RE = re.compile("|".join(sorted({w for ws in ZH_KEYWORDS.values() for w in ws}, key=len, reverse=True)))
_ZH_WORD = {w: s for s, ws in ZH_KEYWORDS.items() for w in ws}


def english_scene(text: str) -> str | None:
    m = _EN_RE.search(str(text).lower())
    return _EN_WORD[m.group(1)] if m else None


def chinese_scene(text: str) -> str | None:
    m = _ZH_RE.search(str(text))
    return _ZH_WORD[m.group(0)] if m else None


def is_chinese(text: str, min_fraction: float = 0.5) -> bool:
    """True when most non-space, non-punctuation characters are CJK ideographs."""
    chars = [c for c in str(text) if c.isalnum()]
    if not chars:
        return False
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in chars)
    return cjk / len(chars) >= min_fraction
