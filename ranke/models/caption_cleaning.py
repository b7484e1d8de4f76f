"""LlamaGen's caption cleaning for web text, applied before T5 (`text.clean_captions`).

LlamaGen's T5 front end (inherited from DeepFloyd IF / PixArt) cleans every caption twice with
one fixed pass: URL-unquote and lower-case; drop URLs, HTML markup, @handles, CJK characters, IP
addresses, file names, long digit runs and shop boilerplate ("free shipping", "click for ...");
unify dashes and quotes; turn runs of odd punctuation into spaces; repair mojibake (ftfy) and
HTML entities; squeeze whitespace and trim stray punctuation at the ends. Its models were trained
on captions cleaned this way, so sampling with the same pass keeps prompts in distribution.
The rules below are that pass, in its order.

Needs the optional extra `pip install 'ranke[captions]'` (ftfy, beautifulsoup4); set
`text.clean_captions=false` to lower-case and strip only.
"""

from __future__ import annotations

import html
import re
import urllib.parse

from ranke.runtime import UserError

_URL_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_FILE_TYPES = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
    "\ufe31\ufe32\ufe58\ufe63\uff0d"
)
# CJK strokes and phonetic extensions, enclosed letters, compatibility, ideographs (ext. A,
# hexagrams, unified)
_CJK_RANGES = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf",
               "\u4dc0-\u4dff", "\u4e00-\u9fff")  # fmt: skip
_ODD_PUNCTUATION = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}"

# (pattern, replacement) before and after the HTML parse, then after ftfy; each list in order
_BEFORE_HTML = (
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
)
_AFTER_HTML = (
    (r"@[\w\d]+\b", ""),
    *((f"[{span}]+", "") for span in _CJK_RANGES),
    (f"[{_DASHES}]+", "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _FILE_TYPES, ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (_ODD_PUNCTUATION, " "),
    (r"\s+\.\s+", " "),
)
_AFTER_FTFY = (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _FILE_TYPES + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, times sign)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # one pair of enclosing quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)
_SEPARATORS = re.compile(r"(?:\-|\_)")


def _substitute(text: str, rules) -> str:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text


def _import_cleaning_dependencies():
    try:
        import ftfy
        from bs4 import BeautifulSoup
    except ImportError:
        raise UserError(
            "caption cleaning (text.clean_captions=true, LlamaGen's default) needs ftfy and beautifulsoup4: "
            "pip install 'ranke[captions]', or set text.clean_captions=false"
        ) from None
    return ftfy, BeautifulSoup


def clean_once(caption: str) -> str:
    """One pass of LlamaGen's caption cleaning (see the module docstring)."""
    ftfy, BeautifulSoup = _import_cleaning_dependencies()
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _substitute(text, _BEFORE_HTML)
    text = BeautifulSoup(text, features="html.parser").text
    text = _substitute(text, _AFTER_HTML)
    if len(_SEPARATORS.findall(text)) > 3:  # this-is-a-slug / this_is_a_slug
        text = _SEPARATORS.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _substitute(text, _AFTER_FTFY).strip()


def clean_caption(caption: str) -> str:
    """LlamaGen's preprocessing of a caption for T5: the cleaning pass, twice."""
    return clean_once(clean_once(caption))
