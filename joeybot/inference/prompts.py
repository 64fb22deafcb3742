"""Prompt layout shared by inference and training.

The adapter must see at inference exactly the token layout it was trained on, so both sides
build their ids here. Two layouts exist:

* chat template: the tokenizer's own template (SmolLM2 uses ChatML) renders the frame, and the
  text of every message is tokenized separately so that it can never produce a special token;
* plain dialogue: for models without a template (tinyllama-15M), a persona paragraph followed by
  `User: ...` and `Joey: ...` lines, one line per turn.

User text is data: it is tokenized with `split_special_tokens=True`, so typing `<|im_end|>` or
`</s>` yields ordinary characters, and in the plain layout line breaks inside a message become
spaces so that no message can start a `Joey:` line of its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
USER_TAG = "User"
BOT_TAG = "Joey"
# Room kept for the reply when a caller asks for more new tokens than the model's positions
# allow: the prompt always gets at least half of the context.
MIN_PROMPT_SHARE = 0.5
# A line that starts another speaker's turn ("\nRoss:", "\nUser:", "\nMr. Geller:") or a ChatML
# marker that a model spells out in plain text. Joey's reply is cut where one starts.
_NAME = r"[A-Z][A-Za-z.'\-]{0,20}(?: [A-Z][A-Za-z.'\-]{0,20}){0,2}"
SPEAKER_LINE = re.compile(rf"\n[ \t]*(?:{_NAME}|\[[^\]\n]{{0,40}}\])[ \t]*:|<\|im_(?:start|end)\|>")
# The unfinished start of such a line: text after the last line break that may still grow into it.
_SPEAKER_PREFIX = re.compile(
    r"[ \t]*(?:[A-Z][A-Za-z.'\-]{0,20}(?: (?:[A-Z][A-Za-z.'\-]{0,20})?){0,2}"
    r"|\[[^\]\n]{0,40}\]?)?[ \t]*"
)
# Joey repeating his own speaker tag at the start of a reply, and its unfinished start.
_OWN_TAG = re.compile(rf"\A\s*{BOT_TAG}[ \t]*:[ \t]*")
_OWN_TAG_PREFIX = re.compile(r"\s*(?:J(?:o(?:e(?:y[ \t]*)?)?)?)?")
_MARKERS = ("<|im_start|>", "<|im_end|>")
_TRAILING_JUNK = re.compile(r"[\s\ufffd]+\Z")
# Private-use characters mark where message text goes in a rendered chat template.
_SLOT = "\ue000{}\ue001"
_SLOT_PATTERN = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Literal["user", "assistant"]
    content: str


@dataclass
class Prompt:
    """Token ids to feed the model, and what was cut to fit the context."""

    input_ids: list[int]
    max_new_tokens: int
    turns_kept: int
    turns_dropped: int
    user_truncated: bool = False
    system_truncated: bool = False


@dataclass
class TrainingExample:
    """Ids of one supervised example; labels are IGNORE_INDEX except on the reply."""

    input_ids: list[int]
    labels: list[int]
    prompt: Prompt = field(repr=False)


class PromptFormatter:
    """Turn a persona, earlier turns and a new user message into model input ids."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, system_prompt: str, max_positions: int
    ) -> None:
        if max_positions < 16:
            raise ValueError(f"max_positions must be at least 16 tokens, got {max_positions}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt.strip()
        self.max_positions = max_positions
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._end_of_turn_ids = self._find_end_of_turn_ids()

    # ----- public API -------------------------------------------------------------------------

    def build(self, history: Sequence[Turn], user_text: str, max_new_tokens: int) -> Prompt:
        """Build the generation prompt, dropping the oldest turns until it fits.

        `max_new_tokens` is lowered when the caller requests more than half of the context,
        so the prompt always keeps room. The returned prompt carries the value to use.
        """
        max_new_tokens = self._clamp_new_tokens(max_new_tokens)
        budget = self.max_positions - max_new_tokens
        return self._fit(list(history), user_text, budget, max_new_tokens)

    def build_training_example(
        self, context: Sequence[Turn], reply: str, max_length: int
    ) -> TrainingExample:
        """Build one example: the prompt for `context`, then `reply` and the end of its turn.

        `context` ends with the user's turn. Labels cover only the reply and its end-of-turn
        tokens, so the model learns to answer and to stop. The prompt part is cut exactly as
        `build` cuts it; the reply is cut from its end only when it alone cannot fit.
        """
        if not context or context[-1].role != "user":
            raise ValueError("context must end with a user turn")
        max_length = min(max_length, self.max_positions)
        reply_ids = self._encode_reply(reply)
        min_prompt = max(8, int(max_length * 0.25))
        if len(reply_ids) > max_length - min_prompt:
            keep = max(1, max_length - min_prompt - len(self._end_of_turn_ids))
            reply_ids = reply_ids[:keep] + self._end_of_turn_ids
        prompt = self._fit(list(context[:-1]), context[-1].content, max_length - len(reply_ids), 0)
        prompt_ids, reply_ids = self._join_for_training(prompt.input_ids, reply, reply_ids)
        input_ids = prompt_ids + reply_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(reply_ids)
        return TrainingExample(input_ids=input_ids, labels=labels, prompt=prompt)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end Joey's turn: every special token.

        Besides end-of-turn and end-of-text, a model may emit a start-of-turn token to open a
        turn of its own; decoding skips special tokens, so it could not be cut afterwards.
        """
        ids = self._special_ids()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def clean_reply(self, text: str) -> str:
        """Cut generated text where another speaker's line starts, and strip whitespace."""
        return _finish(_OWN_TAG.sub("", text[: self.reply_cut_position(text)]))

    def reply_cut_position(self, text: str) -> int:
        """Index in `text` where Joey's turn ends: the first speaker line, or the end."""
        match = SPEAKER_LINE.search(text)
        return len(text) if match is None else match.start()

    def stable_reply_prefix(self, text: str) -> str:
        """Return the part of a growing reply that later tokens cannot change.

        For any continuation `more`, the result is a prefix of `clean_reply(text + more)`;
        streaming emits only this part, so the streamed pieces add up to the final reply.
        """
        if self.reply_cut_position(text) < len(text):
            return self.clean_reply(text)
        hold = len(text)
        last_break = text.rfind("\n")
        if last_break >= 0 and _SPEAKER_PREFIX.fullmatch(text, last_break + 1):
            hold = last_break
        if _OWN_TAG_PREFIX.fullmatch(text):
            hold = 0
        hold = min(hold, _partial_marker_start(text))
        return _finish(_OWN_TAG.sub("", text[:hold]))

    # ----- fitting ----------------------------------------------------------------------------

    def _clamp_new_tokens(self, max_new_tokens: int) -> int:
        ceiling = int(self.max_positions * (1 - MIN_PROMPT_SHARE))
        if max_new_tokens > ceiling:
            logger.debug("max_new_tokens %d lowered to %d to fit", max_new_tokens, ceiling)
        return max(1, min(max_new_tokens, ceiling))

    def _fit(self, history: list[Turn], user_text: str, budget: int, max_new: int) -> Prompt:
        total_turns = len(history)
        history = _normalize(self._pretrim(history, budget))
        # Fewer turns never make the prompt longer, so the number of oldest turns to drop is
        # found by bisection: about log2(n) encodings instead of n.
        low, high = 0, len(history)
        while low < high:
            middle = (low + high) // 2
            if len(self._encode(self.system_prompt, history[middle:], user_text)) <= budget:
                high = middle
            else:
                low = middle + 1
        history = _normalize(history[low:])
        ids = self._encode(self.system_prompt, history, user_text)
        prompt = Prompt(ids, max_new, len(history), total_turns - len(history))
        if len(ids) > budget:
            self._truncate_user(prompt, user_text, budget)
        if len(prompt.input_ids) > budget:
            raise ValueError(
                f"a context of {self.max_positions} tokens cannot hold even the prompt frame; "
                "raise MODEL_MAX_CONTEXT"
            )
        return prompt

    def _pretrim(self, history: list[Turn], budget: int) -> list[Turn]:
        """Drop turns whose text alone already overflows the budget, to skip hopeless tries."""
        used = 0
        for index in range(len(history) - 1, -1, -1):
            # Each turn also costs its frame (speaker tag or role header, line break).
            used += len(self._encode_text(history[index].content)) + 2
            if used > budget:
                return history[index + 1 :]
        return history

    def _truncate_user(self, prompt: Prompt, user_text: str, budget: int) -> None:
        """Cut the newest user message from its start; cut the persona only as a last resort."""
        system = self.system_prompt
        frame = len(self._encode(system, [], ""))
        if frame + 8 > budget:
            system_ids = self._encode_text(system)
            keep = max(0, len(system_ids) - (frame + 8 - budget))
            system = self.tokenizer.decode(system_ids[:keep]).strip()
            prompt.system_truncated = True
            frame = len(self._encode(system, [], ""))
            logger.warning("persona cut to %d tokens to fit a context of %d", keep, budget)
        user_ids = self._encode_text(user_text)
        keep = max(0, budget - frame)
        while True:
            text = self.tokenizer.decode(user_ids[len(user_ids) - keep :]) if keep else ""
            ids = self._encode(system, [], text)
            if len(ids) <= budget or keep == 0:
                break
            keep -= max(1, len(ids) - budget)
        prompt.input_ids = ids
        prompt.user_truncated = True

    # ----- encoding ---------------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        """Tokenize message text as data: special-token strings stay plain characters."""
        if not text:
            return []
        return self.tokenizer(
            replace_lone_surrogates(text), add_special_tokens=False, split_special_tokens=True
        )["input_ids"]

    def _encode(self, system: str, history: Sequence[Turn], user_text: str) -> list[int]:
        if self.uses_chat_template:
            return self._encode_chat(system, history, user_text)
        return self._encode_plain(system, history, user_text)

    def _encode_chat(self, system: str, history: Sequence[Turn], user_text: str) -> list[int]:
        messages, texts = self._slotted_messages(system, history, user_text)
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self._encode_rendered(rendered, texts)

    def _slotted_messages(
        self, system: str, history: Sequence[Turn], user_text: str
    ) -> tuple[list[dict[str, str]], list[str]]:
        texts = [system] + [turn.content for turn in history] + [user_text]
        roles = ["system"] + [turn.role for turn in history] + ["user"]
        messages = [
            {"role": role, "content": _SLOT.format(index)} for index, role in enumerate(roles)
        ]
        return messages, texts

    def _encode_rendered(self, rendered: str, texts: Sequence[str]) -> list[int]:
        """Tokenize the template's frame normally and each message's text as data."""
        ids: list[int] = []
        position = 0
        for match in _SLOT_PATTERN.finditer(rendered):
            frame = rendered[position : match.start()]
            if frame:
                ids += self.tokenizer(frame, add_special_tokens=False)["input_ids"]
            ids += self._encode_text(texts[int(match.group(1))])
            position = match.end()
        tail = rendered[position:]
        if tail:
            ids += self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        return ids

    def _plain_text(self, system: str, history: Sequence[Turn], user_text: str) -> str:
        lines = [_one_line(system), ""] if system else []
        for turn in history:
            tag = BOT_TAG if turn.role == "assistant" else USER_TAG
            lines.append(f"{tag}: {_one_line(turn.content)}")
        lines.append(f"{USER_TAG}: {_one_line(user_text)}")
        lines.append(f"{BOT_TAG}:")
        return "\n".join(lines)

    def _encode_plain(self, system: str, history: Sequence[Turn], user_text: str) -> list[int]:
        return self._bos() + self._encode_text(self._plain_text(system, history, user_text))

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def _encode_reply(self, reply: str) -> list[int]:
        if self.uses_chat_template:
            return self._encode_text(reply.strip()) + self._end_of_turn_ids
        return self._encode_text(" " + _one_line(reply)) + self._end_of_turn_ids

    def _join_for_training(
        self, prompt_ids: list[int], reply: str, reply_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        """Return prompt and reply ids as the model sees them in one sequence.

        In the plain layout the reply is tokenized together with the prompt (SentencePiece
        merges across the boundary differently than piecewise); the prompt part must come out
        unchanged, otherwise the piecewise ids are kept.
        """
        if self.uses_chat_template:
            return prompt_ids, reply_ids
        prompt_text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        joint = self._bos() + self._encode_text(prompt_text + " " + _one_line(reply))
        if joint[: len(prompt_ids)] != prompt_ids:
            return prompt_ids, reply_ids
        reply_part = joint[len(prompt_ids) :]
        budget = len(reply_ids) - len(self._end_of_turn_ids)
        return prompt_ids, reply_part[:budget] + self._end_of_turn_ids

    def _find_end_of_turn_ids(self) -> list[int]:
        """Ids that close an assistant message in this layout (learned by training)."""
        if not self.uses_chat_template:
            newline = self._encode_text("\n")
            # SentencePiece encodes a bare "\n" as a prefix-space token then the newline byte.
            newline = newline[-1:]
            eos = self.tokenizer.eos_token_id
            return newline + ([eos] if eos is not None else [])
        messages = [
            {"role": "system", "content": _SLOT.format(0)},
            {"role": "user", "content": _SLOT.format(1)},
            {"role": "assistant", "content": _SLOT.format(2)},
        ]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        tail = rendered.split(_SLOT.format(2), 1)[1]
        return self.tokenizer(tail, add_special_tokens=False)["input_ids"]

    def _special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)


def _normalize(history: list[Turn]) -> list[Turn]:
    """Start with a user turn and merge consecutive turns of one role.

    Strict chat templates (Llama 2's, for one) reject anything else; trimming and a retried or
    failed reply can leave such histories behind.
    """
    merged: list[Turn] = []
    for turn in history:
        if not merged and turn.role == "assistant":
            continue
        if merged and merged[-1].role == turn.role:
            merged[-1] = Turn(turn.role, merged[-1].content + "\n" + turn.content)
        else:
            merged.append(turn)
    return merged


def replace_lone_surrogates(text: str) -> str:
    """Replace unpaired UTF-16 surrogates (from invalid bytes on stdin or argv) with U+FFFD.

    Tokenizers reject them, and a surrogate stored in a chat's history would break every later
    prompt of that chat.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _one_line(text: str) -> str:
    """Collapse line breaks so a message stays on its own line of the plain layout."""
    return " ".join(text.split())


def _partial_marker_start(text: str) -> int:
    """Index of a trailing piece that may grow into a ChatML marker, or len(text)."""
    start = text.rfind("<", max(0, len(text) - 12))
    if start >= 0 and any(marker.startswith(text[start:]) for marker in _MARKERS):
        return start
    return len(text)


def _finish(reply: str) -> str:
    """Strip whitespace, and trailing U+FFFD left by a character whose last bytes were cut."""
    return _TRAILING_JUNK.sub("", reply.strip())
