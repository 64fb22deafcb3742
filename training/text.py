"""Decode transcript bytes and clean spoken text."""

from __future__ import annotations

import html
import re
import unicodedata

# Bytes that cp1252 leaves undefined. Python's cp1252 codec rejects them, so they are
# decoded as Latin-1 control characters and then removed as control characters.
_CP1252_UNDEFINED = frozenset({0x81, 0x8D, 0x8F, 0x90, 0x9D})

_WHITESPACE = re.compile(r"\s+")
# Innermost direction in parentheses, brackets, braces or angle brackets: "(to Ross)",
# "[hangs up]", "<laughs>" (angle brackets arrive as "&lt;laughs&gt;" entities).
_DIRECTION = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}|<[^<>]*>")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.!?;:…])")
_LEADING_PUNCTUATION = re.compile(r"^[\s,;:.\-–—]+(?=\w|[\"'“‘])")
_REPEATED_COMMA = re.compile(r",\s*(?=[,.!?])")
# UTF-8 text decoded as cp1252 once too often: "â€™" for "’", "Ã©" for "é".
_MOJIBAKE = re.compile(
    r"â€[\x80-\xbf™œšžŸ˜‰‹›¦¡¢£¤¥§¨©ª«¬®¯°±²³´µ¶·¸¹º»¼½¾¿]|Ã[\x80-\xbf©¨§¡¢£¤¥¦ª«¬®¯°±²³´µ¶·¸¹º»¼½¾¿]"
)


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Decode a transcript as UTF-8, or as cp1252 when it is not valid UTF-8.

    Returns ``(text, note)``. ``note`` is empty for UTF-8 and otherwise names the
    fallback that decoded the file. A UTF-8 byte order mark is removed and line ends become
    ``\\n``.
    """
    note = ""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "".join(
            chr(byte) if byte in _CP1252_UNDEFINED else bytes([byte]).decode("cp1252")
            for byte in data
        )
        note = "not valid UTF-8, decoded as cp1252"
    return text.replace("\r\n", "\n").replace("\r", "\n"), note


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (non-breaking spaces included) into one space."""
    return _WHITESPACE.sub(" ", text.replace("\u00a0", " ")).strip()


def has_mojibake(text: str) -> bool:
    """Tell whether ``text`` contains UTF-8 sequences that were decoded as cp1252."""
    return bool(_MOJIBAKE.search(text))


def remove_directions(text: str) -> str:
    """Remove stage directions in parentheses, brackets or braces, nested ones included.

    An opening parenthesis or bracket that is never closed starts a direction that runs to
    the end of the text. A closing one without an opening one ends a direction that started
    at the beginning of the text, because transcribers drop the opening mark more often
    than they write a stray closing one.
    """
    previous = None
    while previous != text:
        previous = text
        text = _DIRECTION.sub(" ", text)
    for opening in "([{<":
        index = text.find(opening)
        if index >= 0:
            text = text[:index]
    for closing in ")]}>":
        index = text.rfind(closing)
        if index >= 0:
            text = text[index + 1 :]
    return text


def clean_spoken_text(text: str) -> str:
    """Turn the raw text of one spoken line into clean, single-spaced Unicode.

    Removes stage directions, leftover HTML entities, control characters and the
    replacement character. Keeps curly quotes and dashes as they are.
    """
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    text = "".join(
        char
        for char in text
        if char in "\n\t" or (unicodedata.category(char) != "Cc" and char != "\ufffd")
    )
    text = remove_directions(text)
    text = text.replace("*", " ")
    text = normalize_whitespace(text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    text = _REPEATED_COMMA.sub("", text)
    text = _LEADING_PUNCTUATION.sub("", text)
    return text.strip()
