"""Preference pairs, the data of preference tuning and reward models: a prompt, a chosen and a
rejected reply, in TRL's standard form (three texts) or its conversational form (the prompt a
list of chat messages ending with the user's turn, each reply one assistant message in a list).

Columns are `prompt`, `chosen` and `rejected` unless the options name others. Each row is
checked as it loads: the three present and of one form, a prompt that ends with the user's
turn; pairs whose two replies are identical teach nothing and are counted and said. Built-in
sets: `hh-rlhf-harmless` (as published) and `sst2-pref`, made from `sst2-chat` at load time
(chosen: the review's right word; rejected: the other one), whose effect exact match checks.
Tokenization follows TRL's (`tokenize_pair`): the reply starts where the prompt alone and
prompt + reply stop sharing tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from peftkit.data import BuiltinDataset, TaskData, cap_samples, data_set_name, read_splits, require_columns
from peftkit.errors import PeftkitError
from peftkit.tasks.base import DATASETS

COLUMNS = ("prompt", "chosen", "rejected")
SENTIMENTS = ("positive", "negative")

DATASETS["hh-rlhf-harmless"] = BuiltinDataset("dpo", {}, answer_format="open")  # open-ended replies: no exact match
DATASETS["sst2-pref"] = BuiltinDataset("dpo", {}, directory="sst2-chat", headline="exact_match")


def sentiment_pairs(row: dict[str, Any]) -> dict[str, Any]:
    """An sst2-chat conversation as a pair: its question, the right word, the other word."""
    *prompt, answer = row["messages"]
    other = SENTIMENTS[1 - SENTIMENTS.index(answer["content"])]
    return {"prompt": prompt, "chosen": [answer], "rejected": [{"role": "assistant", "content": other}]}


DERIVED: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"sst2-pref": sentiment_pairs}


def load_pairs(config: Any, dataset: BuiltinDataset | None) -> TaskData:
    """Checked splits of `prompt`, `chosen` and `rejected` in one form (said as it loads);
    identical pairs are counted (`identical_pairs` in the record) and said."""
    splits = cap_samples(read_splits(config, dataset), config)
    derive = DERIVED.get(data_set_name(config.task_name)) if dataset is not None and config.train_file is None else None
    if derive is not None:
        splits = {name: split.map(derive, remove_columns=split.column_names) for name, split in splits.items()}
    columns = {key: getattr(config, f"{key}_column") or key for key in COLUMNS}
    require_columns(splits, list(columns.values()), "name yours with --set prompt_column=... --set chosen_column=... "
                    "--set rejected_column=...")
    form = pair_form(splits["train"][0], columns, "train", 0)
    identical: dict[str, int] = {}
    for name, split in splits.items():
        rows = [checked_pair(row, columns, form, name, i) for i, row in enumerate(split)]
        identical[name] = sum(row["chosen"] == row["rejected"] for row in rows)
        splits[name] = split.from_list(rows) if rows else split.select_columns(list(columns.values()))
    print(f"data: {form} preference pairs ({', '.join(f'{k}: {v!r}' for k, v in columns.items())})", flush=True)
    for name, count in identical.items():
        if count:
            print(f"warning: {count} {name} pairs have a chosen reply identical to the rejected one: they teach "
                  "nothing and count as ties", flush=True)
    info = {"columns": columns, "data_format": form, "identical_pairs": identical,
            "answer_format": dataset.answer_format if dataset else "text"}
    return TaskData(splits["train"], splits["validation"], info, test=splits.get("test"))


def pair_form(row: dict[str, Any], columns: dict[str, str], split: str, index: int) -> str:
    """`conversational` where the prompt is a list of messages, `standard` where it is text."""
    prompt = row[columns["prompt"]]
    if isinstance(prompt, str):
        return "standard"
    if isinstance(prompt, list):
        return "conversational"
    raise PeftkitError(f"{split} row {index}: the prompt ('{columns['prompt']}') must be text or a list of chat "
                       f"messages, not {type(prompt).__name__}")


def checked_pair(row: dict[str, Any], columns: dict[str, str], form: str, split: str, index: int) -> dict[str, Any]:
    """One pair under the standard names, checked to be of `form` throughout."""
    pair = {key: row[column] for key, column in columns.items()}
    where = f"{split} row {index}"
    if form == "standard":
        if not all(isinstance(value, str) for value in pair.values()):
            raise PeftkitError(f"{where}: prompt, chosen and rejected must all be text, as the first row's are")
        return pair
    prompt = pair["prompt"]
    if not (isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt)):
        raise PeftkitError(f"{where}: the prompt must be a non-empty list of {{role, content}} messages, as the first "
                           "row's is")
    if prompt[-1]["role"] == "assistant":
        raise PeftkitError(f"{where}: the prompt ends with an assistant turn; it must end with the user's turn, the "
                           "replies being the assistant's answer to it (move that turn into chosen and rejected)")
    for key in ("chosen", "rejected"):
        reply = pair[key]
        if not (isinstance(reply, list) and len(reply) == 1 and _is_message(reply[0])
                and reply[0]["role"] == "assistant"):
            raise PeftkitError(f"{where}: {key} must be one assistant message in a list, "
                               '[{"role": "assistant", "content": ...}], as in TRL\'s conversational format')
    return pair


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def reply_text(reply: Any) -> str:
    """A reply's text, in either form."""
    return reply if isinstance(reply, str) else reply[-1]["content"]


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as the chat messages generation answers (a text prompt is the user's turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def tokenize_pair(tokenizer: Any, pair: dict[str, Any]) -> dict[str, list[int]]:
    """`prompt_ids`, `chosen_ids` and `rejected_ids` as TRL's DPO tokenizes a pair: each reply
    from where the prompt alone and prompt + reply stop sharing tokens (a standard pair's
    replies end with the end-of-text token)."""
    from trl.data_utils import common_prefix_length

    def ids(messages: Any, generation_prompt: bool = False) -> list[int]:
        if isinstance(messages, str):
            return tokenizer(messages, add_special_tokens=False)["input_ids"]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    standard = isinstance(pair["prompt"], str)
    end = (tokenizer.eos_token or "") if standard else ""
    prompt = ids(pair["prompt"], generation_prompt=True)
    whole = {key: ids(pair["prompt"] + pair[key] + end) if standard else ids(pair["prompt"] + pair[key])
             for key in ("chosen", "rejected")}
    shared = min(common_prefix_length(prompt, whole["chosen"]), common_prefix_length(prompt, whole["rejected"]))
    return {"prompt_ids": prompt[:shared], "chosen_ids": whole["chosen"][shared:],
            "rejected_ids": whole["rejected"][shared:]}


def margin_summary(margins: Sequence[float]) -> tuple[float, float]:
    """Of per-pair margins (chosen minus rejected): the share where the chosen reply wins
    (strictly: a tie does not) and the mean margin."""
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
