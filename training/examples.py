"""Turn transcript lines into Joey examples, and examples into the prompt formatter's turns.

A record is one line that Joey says alone, with the lines before it in the same scene:

    {"id": "0101-s3-l12", "episode": "0101", "scene": 3,
     "context": [{"speaker": "Monica", "text": "..."}, ...], "reply": "..."}

``scene`` and the ``l`` number in the id count from 1 within the episode and the scene.

Mapping to turns (`record_to_turns`):

* Joey's own earlier lines become ``assistant`` turns. Every other line, a group line that
  includes Joey among others too, becomes ``user`` text.
* Consecutive lines of other speakers merge into one ``user`` turn, one line each, without
  speaker names, because at inference a Telegram user's message carries no name either.
  Consecutive Joey lines merge into one ``assistant`` turn.
* The context must end with a ``user`` turn. A record whose last context line is Joey's own
  (he speaks twice in a row, usually around a stage direction) is not usable, and neither is
  one without any context. `unusable_reason` names the reason and the data preparation
  counts these drops.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from joeybot.inference.prompts import Turn
from training.transcripts import JOEY, Episode, Line

DEFAULT_CONTEXT_LINES = 6

# Reasons for lines of Joey that yield no example, as printed in the summary.
REASON_GROUP = "Joey speaks in a group line (kept as context only)"
REASON_NO_CONTEXT = "Joey's line opens the scene (no context)"
REASON_CONTEXT_ENDS_WITH_JOEY = "the context ends with Joey's own line"
REASON_DUPLICATE = "duplicate of an earlier example in the same episode"


class UnusableRecordError(ValueError):
    """Raised when a record cannot become a training example; the message is the reason."""


@dataclass(frozen=True)
class Candidate:
    """A line that Joey says alone, with up to N earlier lines of its scene."""

    episode: str
    scene: int
    line: int
    context: tuple[Line, ...]
    reply: str

    def to_record(self) -> dict[str, Any]:
        return {
            "id": f"{self.episode}-s{self.scene}-l{self.line}",
            "episode": self.episode,
            "scene": self.scene,
            "context": [{"speaker": line.speaker, "text": line.text} for line in self.context],
            "reply": self.reply,
        }


def iter_joey_lines(episode: Episode, context_lines: int) -> Iterator[Candidate | str]:
    """Yield a Candidate for each line Joey says alone, or a reason for a group line.

    Group lines that include Joey ("Joey and Chandler: Hey!") yield REASON_GROUP: they stay
    in other examples' context but never become Joey's reply, because the text is not
    his alone.
    """
    if context_lines < 0:
        raise ValueError(f"context_lines must be 0 or more, got {context_lines}")
    for scene_index, scene in enumerate(episode.scenes, start=1):
        for line_index, line in enumerate(scene):
            if line.is_group and JOEY in line.speaker.split(" and "):
                yield REASON_GROUP
                continue
            if line.speaker != JOEY:
                continue
            start = max(0, line_index - context_lines)
            yield Candidate(
                episode=episode.episode_id,
                scene=scene_index,
                line=line_index + 1,
                context=tuple(scene[start:line_index]),
                reply=line.text,
            )


Role = Literal["user", "assistant"]


def _role(speaker: str) -> Role:
    return "assistant" if speaker == JOEY else "user"


def merge_context(context: Sequence[Mapping[str, str]]) -> list[tuple[Role, str]]:
    """Merge consecutive lines of one role into ``(role, text)`` pairs, lines joined by newlines."""
    merged: list[tuple[Role, list[str]]] = []
    for line in context:
        role = _role(line["speaker"])
        if merged and merged[-1][0] == role:
            merged[-1][1].append(line["text"])
        else:
            merged.append((role, [line["text"]]))
    return [(role, "\n".join(texts)) for role, texts in merged]


def unusable_reason(record: Mapping[str, Any]) -> str | None:
    """Return why a record cannot become an example, or None when it can."""
    merged = merge_context(record["context"])
    if not merged:
        return REASON_NO_CONTEXT
    if merged[-1][0] != "user":
        return REASON_CONTEXT_ENDS_WITH_JOEY
    return None


def record_to_turns(record: Mapping[str, Any]) -> tuple[list[Turn], str]:
    """Return ``(context turns, reply)`` for `PromptFormatter.build_training_example`.

    Raises UnusableRecordError when the context is empty or ends with Joey's own line.
    """
    reason = unusable_reason(record)
    if reason:
        raise UnusableRecordError(f"record {record.get('id', '?')}: {reason}")
    turns = [Turn(role=role, content=text) for role, text in merge_context(record["context"])]
    return turns, record["reply"]
