"""Read Friends episode transcripts (HTML files or a CSV/TSV of lines) into scenes of lines.

Several transcribers wrote the HTML files by hand, each in a different layout, and the
reader accepts all of them. Speakers appear in ``<b>``/``<strong>`` or as plain ``NAME:``
text, sometimes both in one file. Lines wrap over several source lines and are separated
by ``<p>`` or by ``<br>``. The files also contain scene headings in brackets, stage
directions in parentheses or brackets, credits, commercial breaks, HTML entities, and
cp1252 bytes that are not valid UTF-8.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from training.text import clean_spoken_text, decode_bytes, normalize_whitespace

JOEY = "Joey"

# Block-level tags: each start or end tag ends the current block of text.
_BLOCK_TAGS = frozenset(
    "p br div h1 h2 h3 h4 h5 h6 hr li ul ol table tr td th title blockquote center pre "
    "body head html dd dt dl".split()
)
_BOLD_TAGS = frozenset({"b", "strong"})
_SKIPPED_TAGS = frozenset({"title", "script", "style"})

# A speaker prefix: a name of up to 60 characters, an optional direction in parentheses or
# brackets ("Joey (to Ross):"), then one or more colons.
_SPEAKER_LINE = re.compile(
    r"^(?P<name>[A-Za-z0-9][^:()\[\]{}<>\"!?]{0,59}?)\s*"
    r"(?P<direction>(?:\([^()]*\)|\[[^\[\]]*\])\s*)?:+\s*(?P<text>.*)$",
    re.DOTALL,
)
# A block that opens a new scene: "[Scene: ...]", "Scene: ...", "[Time lapse]", "Cut to: ...".
_SCENE_HEADING = re.compile(
    r"^[\[(]?\s*(?:scene|setting|location|cut\s+to|time\s*lapse|flash\s*back)\b\s*[:.\-\])]",
    re.IGNORECASE,
)
# Bracketed blocks that start a new stretch of dialogue without the word "scene".
_CUT_HEADING = re.compile(
    r"^[\[(]\s*(?:later|back\s+to|the\s+next\s+(?:day|morning)|dream\s+sequence|fantasy|"
    r"end\s+of\s+(?:flashback|dream|fantasy))\b",
    re.IGNORECASE,
)
# Blocks that separate parts of an episode, compared after stripping brackets and stars.
_BREAK_BLOCKS = frozenset(
    {
        "opening titles",
        "opening credits",
        "opening scene",
        "closing titles",
        "closing credits",
        "ending credits",
        "end credits",
        "credits",
        "commercial",
        "commercial break",
        "commerical break",
        "to be continued",
        "present day",
        "the next morning",
        "the next day",
        "end",
        "the end",
        "end of show",
        "end of episode",
    }
)
# Words that show a "Name:" prefix is a credit or a note, not a speaker.
_NOT_SPEAKER_WORDS = frozenset(
    "by written transcribed transcriber transcriber's teleplay story directed produced "
    "note notes adjustments additional hosted copyright disclaimer originally aired "
    "episode season part title".split()
)
# Speaker names that stand for a group of people.
_GROUP_NAMES = frozenset(
    "all everyone everybody both together crowd group gang guys girls boys friends "
    "the guys the girls the gang the boys all three all six all five all four the others "
    "others the crowd audience people the group chorus".split(" ")
)
# Spellings of Joey's name as the transcribers wrote it (compared in lower case).
_JOEY_ALIASES = frozenset(
    {
        "joey",
        "joey tribbiani",
        "joseph",
        "joseph tribbiani",
        "joe",
        "jeoy",
        "joye",
        "jooey",
        "joeey",
        "joery",
        "joeh",
        "joy",
        "joe y",
        "jo ey",
        "joeu",
        "jowy",
        "jeey",
    }
)
# Other main characters, for tidy canonical names and group detection.
_CANONICAL_NAMES = {
    "chandler": "Chandler",
    "chandler bing": "Chandler",
    "chan": "Chandler",
    "chander": "Chandler",
    "monica": "Monica",
    "monica geller": "Monica",
    "mnca": "Monica",
    "rachel": "Rachel",
    "rachel green": "Rachel",
    "rach": "Rachel",
    "rache": "Rachel",
    "racel": "Rachel",
    "rahcel": "Rachel",
    "phoebe": "Phoebe",
    "phoe": "Phoebe",
    "phoebe buffay": "Phoebe",
    "pheobe": "Phoebe",
    "phoebs": "Phoebe",
    "pheebs": "Phoebe",
    "ross": "Ross",
    "ross geller": "Ross",
    "roos": "Ross",
}
_NAME_SEPARATOR = re.compile(r"\s*(?:,|&|/|\+|\band\b)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Line:
    """One spoken line: the speaker's canonical name and the cleaned text."""

    speaker: str
    text: str
    is_group: bool = False


@dataclass
class Episode:
    """The lines of one episode file, grouped by scene, plus what was dropped and why."""

    episode_id: str
    source: str
    scenes: list[list[Line]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)

    @property
    def line_count(self) -> int:
        return sum(len(scene) for scene in self.scenes)

    def joey_line_count(self) -> int:
        return sum(1 for scene in self.scenes for line in scene if line.speaker == JOEY)


# --- speakers ---------------------------------------------------------------------------------


def _canonical_single_name(name: str) -> str:
    key = name.lower().strip(" .'-")
    key = re.sub(r"\s+", " ", key)
    if key in _JOEY_ALIASES:
        return JOEY
    if key in _CANONICAL_NAMES:
        return _CANONICAL_NAMES[key]
    words = re.sub(r"\s+", " ", name.strip(" -")).split(" ")
    if name.isupper():
        return " ".join(word[:1] + word[1:].lower() for word in words)
    # Mixed case keeps acronyms such as "TV" and only capitalises each word's first letter.
    return " ".join(word[:1].upper() + word[1:] for word in words)


def normalize_speaker(raw: str) -> tuple[str, bool]:
    """Map a speaker label to a canonical name and tell whether it is a group.

    Returns ``(name, is_group)``. "JOEY", "Joey Tribbiani" and known misspellings become
    "Joey". A label naming several people ("Joey and Chandler", "Ross, Rachel") or a
    group word ("All", "Everyone") is a group, and its name lists the canonical members.
    """
    name = normalize_whitespace(raw).strip(" .:-")
    lowered = name.lower()
    if lowered in _GROUP_NAMES:
        return lowered.title(), True
    parts = [part for part in _NAME_SEPARATOR.split(name) if part.strip(" .")]
    if len(parts) > 1:
        members = [_canonical_single_name(part) for part in parts]
        return " and ".join(members), True
    return _canonical_single_name(name), False


def _has_no_credit_word(words: list[str]) -> bool:
    return not any(word.lower().strip(".'") in _NOT_SPEAKER_WORDS for word in words)


def _looks_like_speaker(name: str) -> bool:
    words = name.replace(",", " ").split()
    if not words or len(words) > 6 or not _has_no_credit_word(words):
        return False
    # Every word is capitalised, a connector or a short token such as "#1" or "Jr.".
    connectors = {"and", "&", "/", "+", "of", "the", "de", "van", "von", "la"}
    for word in words:
        if word.lower() in connectors:
            continue
        if not (word[0].isupper() or word[0].isdigit() or word[0] == "#"):
            return False
    return True


# --- HTML to blocks ---------------------------------------------------------------------------


@dataclass
class _Block:
    """The text between two block tags, in runs marked bold or not.

    ``after_single_br`` is true when exactly one ``<br>`` separates the block from the
    previous one. Such a block can be the wrapped rest of the previous spoken line.
    """

    parts: list[tuple[str, bool]] = field(default_factory=list)
    after_single_br: bool = False

    def text(self) -> str:
        return "".join(text for text, _ in self.parts)

    def text_with_bold_marks(self) -> str:
        """Return the text with _BOLD_MARK before every bold run that follows plain text."""
        pieces = []
        previous_bold = True
        for text, is_bold in self.parts:
            if is_bold and not previous_bold:
                pieces.append(_BOLD_MARK)
            pieces.append(text)
            if text.strip():
                previous_bold = is_bold
        return "".join(pieces)

    def split_leading_bold(self) -> tuple[str, str]:
        """Split the block into the text of its leading bold run and the rest."""
        bold: list[str] = []
        index = 0
        while index < len(self.parts):
            text, is_bold = self.parts[index]
            if is_bold:
                bold.append(text)
            elif text.strip():
                break
            index += 1
        rest = "".join(text for text, _ in self.parts[index:])
        return "".join(bold), rest


class _BlockCollector(HTMLParser):
    """Split an HTML document into blocks of text, marking bold runs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[_Block] = []
        self._current = _Block()
        self._breaks_since_text: list[str] = []
        self._bold_depth = 0
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip_depth += 1
        if tag in _BLOCK_TAGS:
            self._end_block(tag)
        if tag in _BOLD_TAGS:
            self._bold_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self._end_block(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS and self._skip_depth:
            self._skip_depth -= 1
        if tag in _BLOCK_TAGS:
            self._end_block(tag)
        if tag in _BOLD_TAGS and self._bold_depth:
            self._bold_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._current.parts.append((data, self._bold_depth > 0))

    def close(self) -> None:
        super().close()
        self._end_block("")

    def _end_block(self, tag: str) -> None:
        if self._current.text().strip():
            self._current.after_single_br = self._breaks_since_text == ["br"]
            self.blocks.append(self._current)
            self._breaks_since_text = []
        self._breaks_since_text.append(tag)
        self._current = _Block()


def html_blocks(html: str) -> list[_Block]:
    """Split an HTML document into its non-empty blocks of text."""
    collector = _BlockCollector()
    collector.feed(html)
    collector.close()
    return collector.blocks


# --- blocks to lines --------------------------------------------------------------------------

_MAIN_CAST = frozenset(name.lower() for name in _CANONICAL_NAMES.values()) | {"joey"}
# Words that mark "Well here's the thing:" as the start of a sentence, not a speaker label.
_SENTENCE_WORDS = frozenset(
    "i i'm i've you you're we he she it it's they me my your this that what here's there's "
    "is are was were be been just so well ok okay oh yeah no yes hey if when".split()
)
_NAME_CONNECTORS = frozenset({"and", "&", "/", "+", ","})


def _known_prefix(name: str, known: set[str]) -> str | None:
    """Return the leading speaker label of "Joey nods" or "Ross and Rachel while looking".

    The label is the run of capitalised words and connectors before the first lower-case
    word. Each name in it must be a speaker of this file, a main character or a group word.
    """
    words = name.replace(",", " , ").split()
    label: list[str] = []
    for word in words:
        if word.lower() in _NAME_CONNECTORS or word[:1].isupper():
            label.append(word)
        else:
            break
    while label and label[-1].lower() in _NAME_CONNECTORS:
        label.pop()
    if not label or len(label) == len(words):
        return None
    text = " ".join(label).replace(" , ", ", ")
    members = [part for part in _NAME_SEPARATOR.split(text) if part.strip()]
    accepted = known | _MAIN_CAST | _GROUP_NAMES
    if all(member.lower().strip(" .") in accepted for member in members):
        return text
    return None


def _split_speaker(text: str, known: set[str] | None = None) -> tuple[str, str] | None:
    """Return ``(speaker label, spoken text)`` when ``text`` starts with a speaker prefix.

    Without ``known`` only plain labels count ("Joey:", "MR. HECKLES:", "Joey (to Ross):").
    With the file's known labels, a label followed by a description also counts ("Joey
    nods: Yeah." is Joey's line), and so does a short label whose first word is
    capitalised ("TV announcer:", "Woman at door:").
    """
    match = _SPEAKER_LINE.match(text)
    if not match:
        return None
    name = normalize_whitespace(match.group("name"))
    spoken = match.group("text")
    if _looks_like_speaker(name) or name.lower() in _MAIN_CAST:
        return name, spoken
    if known is None:
        return None
    prefix = _known_prefix(name, known)
    if prefix:
        return prefix, spoken
    words = name.split()
    if (
        len(words) <= 5
        and words[0][:1].isupper()
        and _has_no_credit_word(words)
        and not any(word.lower() in _SENTENCE_WORDS for word in words)
    ):
        return name, spoken
    return None


def _known_speakers(blocks: Iterable[_Block]) -> set[str]:
    """Collect the lower-cased labels that some block of the file writes as ``Name:``."""
    known: set[str] = set()
    for block in blocks:
        split = _split_speaker(normalize_whitespace(block.text()))
        if split:
            known.add(split[0].lower())
    return known


# Places inside a block where another speaker's line may start: a new source line, a bold
# run (marked with _BOLD_MARK) or the end of a sentence followed by an upper-case label.
_BOLD_MARK = "\x00"
_INNER_SPEAKER = re.compile(
    r"(?:\n[ \t]*|\x00\s*|(?<=[.!?])[ \t]*(?=[A-Z][A-Z .'\-]{1,30}:))(?=[A-Z][A-Za-z .'\-]{0,30}:)"
)


def _split_inner_lines(text: str, known: set[str]) -> list[str]:
    """Split a block where a known speaker's line starts inside it.

    ``text`` marks each bold run after the start with _BOLD_MARK. A split needs the label
    of a main character or one that the file uses at the start of a block, at a line
    break, a bold run or (upper case only) a sentence end. So "Okay, Monica: right foot
    red" stays one line.
    """
    pieces: list[str] = []
    start = 0
    for match in _INNER_SPEAKER.finditer(text):
        if match.start() == 0:
            continue
        first_line = text[match.end() :].split("\n", 1)[0]
        split = _split_speaker(normalize_whitespace(first_line.replace(_BOLD_MARK, " ")))
        if split and (split[0].lower() in known or split[0].lower() in _MAIN_CAST):
            pieces.append(text[start : match.start()])
            start = match.end()
    pieces.append(text[start:])
    return [piece.replace(_BOLD_MARK, " ") for piece in pieces]


def _is_heading(text: str) -> bool:
    if _SCENE_HEADING.match(text) or _CUT_HEADING.match(text):
        return True
    return text.strip(" []()*:.!").lower() in _BREAK_BLOCKS


@dataclass(frozen=True)
class _Item:
    """One classified piece of a block: a scene break, a speaker's line or other text."""

    kind: str  # "scene", "line" or "other"
    text: str
    speaker: str = ""


def _classify_block(block: _Block, known: set[str]) -> list[_Item]:
    text = normalize_whitespace(block.text())
    if _is_heading(text):
        return [_Item("scene", text)]

    pieces = _split_inner_lines(block.text_with_bold_marks(), known)
    if len(pieces) == 1:
        bold, rest = block.split_leading_bold()
        bold_name = normalize_whitespace(bold).strip(" :")
        rest_text = normalize_whitespace(rest)
        # "<b>Phoebe</b> Thank you." names the speaker in bold without a colon.
        if bold_name.lower() in known and not rest_text.startswith(":"):
            if not _split_speaker(text, known):
                return [_Item("line", rest_text, bold_name)]

    items = []
    for piece in pieces:
        piece_text = normalize_whitespace(piece)
        split = _split_speaker(piece_text, known) if piece_text else None
        if split:
            items.append(_Item("line", split[1], split[0]))
        elif piece_text:
            items.append(_Item("other", piece_text))
    return items


def _is_direction(text: str) -> bool:
    """Tell whether a block without a speaker is a stage direction.

    A direction starts with an opening bracket. Its closing bracket may be missing or of
    another kind, because some directions run over several paragraphs.
    """
    return text.lstrip()[:1] in "([{<"


def parse_html_episode(data: bytes, episode_id: str, source: str = "") -> Episode:
    """Parse one episode HTML file into scenes of cleaned lines.

    A new scene starts at a scene heading, a cut or time lapse, or a credits or
    commercial-break block. Text without a speaker that follows a spoken line after a single
    ``<br>`` continues that line, because some transcribers wrap lines with ``<br>``. Stage
    directions between lines are skipped. Other text without a speaker, and lines that clean
    to nothing, are dropped and counted in ``Episode.dropped``.
    """
    episode = Episode(episode_id=episode_id, source=source)
    html, encoding_note = decode_bytes(data)
    if encoding_note:
        episode.warnings.append(encoding_note)
    blocks = html_blocks(html)
    known = _known_speakers(blocks)

    scene: list[Line] = []
    pending: list[str] = []  # speaker label, then the text pieces of the open line
    seen_line = False

    def finish_line() -> None:
        if pending:
            line = _make_line(pending[0], " ".join(pending[1:]), episode)
            if line:
                scene.append(line)
            pending.clear()

    for block in blocks:
        for item in _classify_block(block, known):
            if item.kind == "scene":
                finish_line()
                if scene:
                    episode.scenes.append(scene)
                    scene = []
            elif item.kind == "line":
                finish_line()
                pending.extend([item.speaker, item.text])
                seen_line = True
            elif pending and block.after_single_br:
                pending.append(item.text)
            elif _is_direction(item.text):
                continue
            elif not seen_line:
                episode.dropped["title and credits"] += 1
            else:
                episode.dropped["text without a speaker"] += 1
    finish_line()
    if scene:
        episode.scenes.append(scene)
    return episode


def _make_line(raw_speaker: str, raw_text: str, episode: Episode) -> Line | None:
    speaker, is_group = normalize_speaker(raw_speaker)
    text = clean_spoken_text(raw_text)
    if not text:
        episode.dropped["empty after removing directions"] += 1
        return None
    return Line(speaker=speaker, text=text, is_group=is_group)


def read_html_folder(folder: Path) -> list[Episode]:
    """Parse every ``*.html``/``*.htm`` file of ``folder``, in file-name order."""
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in {".html", ".htm"})
    return [parse_html_episode(path.read_bytes(), path.stem, source=path.name) for path in paths]


# --- CSV/TSV input ----------------------------------------------------------------------------

_CSV_COLUMNS = {
    "season": ("season", "season_id", "season_number"),
    "episode": ("episode", "episode_id", "episode_number"),
    "scene": ("scene", "scene_id", "scene_number"),
    "speaker": ("speaker", "character", "author", "name", "person"),
    "text": ("text", "line", "dialogue", "dialog", "quote", "transcript"),
}


def _find_columns(header: list[str], source: str) -> dict[str, str]:
    lowered = {name.strip().lower(): name for name in header}
    columns: dict[str, str] = {}
    for column, aliases in _CSV_COLUMNS.items():
        found = next((lowered[alias] for alias in aliases if alias in lowered), None)
        if found is None:
            raise ValueError(
                f"{source}: missing a {column!r} column (accepted names: {', '.join(aliases)}); "
                f"the header is {header}"
            )
        columns[column] = found
    return columns


def _episode_id(season: str, episode: str) -> str:
    try:
        return f"{int(float(season)):02d}{int(float(episode)):02d}"
    except ValueError:
        return f"{season.strip()}-{episode.strip()}"


def read_table(path: Path) -> list[Episode]:
    """Read a CSV or TSV of lines with season, episode, scene, speaker and text columns.

    The delimiter is a tab for ``.tsv`` files and a comma otherwise. Rows keep their file
    order within an episode, and a change of the scene value starts a new scene.
    """
    text, _ = decode_bytes(path.read_bytes())
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if reader.fieldnames is None:
        raise ValueError(f"{path}: the file is empty, a header row is expected")
    columns = _find_columns(list(reader.fieldnames), str(path))

    episodes: dict[str, Episode] = {}
    last_scene: dict[str, str] = {}
    for row in reader:
        episode_id = _episode_id(row[columns["season"]] or "", row[columns["episode"]] or "")
        episode = episodes.setdefault(episode_id, Episode(episode_id, source=path.name))
        scene_key = (row[columns["scene"]] or "").strip()
        if not episode.scenes or last_scene.get(episode_id) != scene_key:
            episode.scenes.append([])
            last_scene[episode_id] = scene_key
        speaker = (row[columns["speaker"]] or "").strip()
        if not speaker:
            episode.dropped["text without a speaker"] += 1
            continue
        line = _make_line(speaker, row[columns["text"]] or "", episode)
        if line:
            episode.scenes[-1].append(line)
    for episode in episodes.values():
        episode.scenes = [scene for scene in episode.scenes if scene]
    return [episodes[key] for key in sorted(episodes)]
