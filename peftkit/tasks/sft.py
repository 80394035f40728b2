"""Instruction tuning (supervised fine-tuning) of a causal LM, trained with TRL's SFTTrainer.

Data, in any of four formats, detected from the columns (or named by the column options) and
said in one line as it loads (`data_format` in the run record): OpenAI chat `messages` (a
list of {role, content}, roles system/user/assistant; built-in `sst2-chat`, `dolly`);
ShareGPT `conversations` (a list of {from, value}; human/gpt/system, or user/assistant);
Alpaca `instruction`, optional `input` and `output` (the input joined after the instruction
by a blank line, or placed by `prompt_template`'s `{instruction}` and `{input}`); or a
`prompt` and a `completion` column (built-in `gsm8k`). A role outside these is refused with
its row. Each is rendered with the model's own chat template or the one given in the config.
The loss falls on the assistant's tokens only, the end-of-turn token included, so the model
learns to stop. Packing (`packing: true`) puts several examples in one row with position ids
restarting at each, and no attention mask: transformers then builds a block-diagonal causal
mask, so no example attends to another. Evaluation: validation loss and perplexity over the answers' tokens, then greedy
generation on the validation prompts (batched, left-padded), scored by exact match after
SQuAD-style normalization and by ROUGE-L (rouge-score); for `gsm8k` the number after `####`.
The generations are saved as predictions.jsonl.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.data import cap_samples, read_splits, require_columns
from peftkit.errors import PeftkitError
from peftkit.memory.generation import kv_cache_bytes
from peftkit.memory.heads import fused_lm_head_bytes
from peftkit.options import SftOptions
from peftkit.text_metrics import bleu_score, normalize_answer, rouge_scores
from peftkit.tasks.base import (DATASETS, BuiltinDataset, Evaluation, Prepared, Reply, Task, TaskData,
                                generation_summary, language_model_loss, references_of, register_task,
                                rows_to_generate, take_truncation_counts)

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig

SUMMARY_PROMPT = "Summarize this scientific abstract in one sentence.\n\n{prompt}"

DATASETS["sst2-chat"] = BuiltinDataset("sft", {"messages_column": "messages"})
DATASETS["dolly"] = BuiltinDataset("sft", {"messages_column": "messages"}, headline="rouge_l")  # open-ended answers
DATASETS["gsm8k"] = BuiltinDataset("sft", {"prompt_column": "prompt", "completion_column": "completion"},
                                   hub=("openai/gsm8k", "main"), hub_columns={"question": "prompt", "answer": "completion"},
                                   answer_format="gsm8k")
DATASETS["scitldr"] = BuiltinDataset("sft", {"prompt_column": "document", "completion_column": "summary",
                                              "references_column": "references", "prompt_template": SUMMARY_PROMPT},
                                   headline="rouge_l")


@register_task("sft")
class InstructionTuning(Task):
    description = "chat messages or prompt/completion -> the assistant's answer (causal LM)"
    model_class = "AutoModelForCausalLM"
    model_suffix = "ForCausalLM"
    peft_task_type = "CAUSAL_LM"
    metrics = ("loss", "perplexity", "exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu")
    selects = "loss"
    primary = "exact_match"
    table_metrics = ("exact_match", "rouge_l", "perplexity")
    pretrained_head = True
    generates_text = True
    default_max_length = 1024
    options = SftOptions
    predicts = False  # its runs answer chat prompts: `peftkit generate`
    reads = "conversations"  # grpo takes its data sets (grpo:sst2-chat)
    prediction_fields = ("prompt", "references", "generated")

    def output_memory(self, config: Any, batch_size: int, seq_len: int, eval_batch_size: int, eval_seq_len: int,
                      bytes_per_value: int, device: str, max_new_tokens: int, answer_tokens: int | None = None,
                      eval_answer_tokens: int | None = None, num_beams: int = 1,
                      generation_batch: tuple[int, int] = (1, 1)) -> dict[str, int]:
        """TRL's fused LM head scores the answers' positions in tiles, in training and in the
        evaluation loss; generation, a pass of its own, keeps every layer's keys and values for
        the prompts and answers of its largest batch."""
        train_scored = batch_size * min(seq_len, answer_tokens or seq_len)
        eval_scored = eval_batch_size * min(eval_seq_len, eval_answer_tokens or eval_seq_len)
        rows, prompt = generation_batch
        return {"output_layer": fused_lm_head_bytes(config, train_scored, device, backward=True,
                                                    bytes_per_value=bytes_per_value),
                "evaluation_output": fused_lm_head_bytes(config, eval_scored, device, backward=False,
                                                         bytes_per_value=bytes_per_value),
                "generation_cache": kv_cache_bytes(config, rows, prompt + max_new_tokens, bytes_per_value)}

    def estimate_options(self, config: RunConfig) -> dict[str, Any]:
        """The answers it generates, and whether its training rows are packed."""
        return {**super().estimate_options(config), "max_new_tokens": config.max_new_tokens, "packing": config.packing}

    def longest_answers(self, prepared: Prepared, config: RunConfig) -> dict[str, int]:
        """Also the answer tokens of the fullest batch: the fused LM head scores only labelled
        positions. Training batches are drawn at random, so the bound is a batch's worth of the
        longest answers, which no batch exceeds (one with the longest answer seldom holds the
        next-longest ones: in 7 Dolly examples, 471 and 134 of a batch of 2, not 2 x 471).
        Evaluation runs in the split's order (`trainer.Timed`): the fullest batch it really
        holds, not that bound (the 16 longest answers of Dolly's validation split hold 2,859)."""
        def answers(split: Any) -> list[int]:
            return [sum(label != -100 for label in labels) for labels in split["labels"]]

        train = sorted(answers(prepared.train), reverse=True)
        evaluated = [split for name, split in prepared.splits.items() if name != "train"]  # selection, validation, test
        size = config.eval_batch_size
        fullest_eval = max(sum(counts[first: first + size]) for split in evaluated for counts in [answers(split)]
                           for first in range(0, len(counts), size))
        return {"longest_train_answer": train[0], "longest_eval_answer": max(max(answers(split)) for split in evaluated),
                "fullest_train_batch_answers": sum(train[:config.batch_size]), "fullest_eval_batch_answers": fullest_eval}

    def check_config(self, config: RunConfig, strategy: Any) -> None:
        if config.packing and strategy.name in ("prompt-tuning", "prefix-tuning", "p-tuning"):
            raise PeftkitError(f"packing puts several examples in one row, and {strategy.name} would give the whole row "
                               "one set of virtual tokens: drop packing for prompt learning")

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        """Checked splits with one `messages` column, whatever the source's format; the format
        found is printed, so that a column read differently from the user's intent shows."""
        splits = read_splits(config, dataset)
        defaults = dataset.columns if dataset and config.train_file is None else {}
        data_format, columns = _columns(config, defaults, splits["train"])
        require_columns(splits, list(columns.values()), "name them with --set messages_column=... or "
                        "--set prompt_column=... --set completion_column=...")
        splits = cap_samples(splits, config)
        template = config.prompt_template or defaults.get("prompt_template")
        _check_template(template, data_format, columns)
        print(f"data: {data_format} ({_describe(data_format, columns, template, config)})", flush=True)
        references = config.references_column or defaults.get("references_column")
        for split, data in splits.items():
            splits[split] = data.map(lambda row, i: _example(row, data_format, columns, template, references, split, i),
                                     with_indices=True, remove_columns=data.column_names)
        return TaskData(splits["train"], splits["validation"],
                        {"columns": columns, "data_format": data_format,
                         "answer_format": dataset.answer_format if dataset else "text",
                         "prompt_template": template, "references_column": references},
                        test=splits.get("test"))

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        from peftkit.models import load_causal_lm

        return load_causal_lm(source, tokenizer, quantization, **weights)

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Token ids with labels on the assistant turns only; the chat template is set on the
        tokenizer, which is saved with the run (so `generate` renders prompts the same way)."""
        set_chat_template(tokenizer, config.chat_template)

        def encode(row: dict[str, Any]) -> dict[str, Any]:
            ids, labels = tokenize_conversation(tokenizer, row["messages"], config.max_length)
            cut = len(ids) == config.max_length and _untruncated_length(tokenizer, row["messages"]) > config.max_length
            return {"input_ids": ids, "labels": labels, "length": len(ids), "truncated": int(cut)}

        splits, truncated = take_truncation_counts(
            {name: split.map(encode, remove_columns=["messages"]) for name, split in data.splits().items()})
        before = len(splits["train"])
        splits["train"] = splits["train"].filter(lambda row: any(label != -100 for label in row["labels"]))
        if len(splits["train"]) == 0:
            raise PeftkitError(f"no training example keeps an answer token within max_length={config.max_length}: "
                               "raise --max-length")
        generated = [rows_to_generate(rows, config) for name, rows in data.splits().items() if name in ("validation", "test")]
        prompts = [encode_prompts(tokenizer, [row["messages"][:-1] for row in rows]) for rows in generated]
        info = {**data.info, "truncated_examples": truncated,
                "dropped_train_examples": before - len(splits["train"]),  # cut before any answer token
                "generation_batch": largest_generation_batch(prompts, config.eval_batch_size, config.max_new_tokens)}
        return Prepared(splits, data.splits(), info)

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        from peftkit.trainer import build_optimizer

        optimizer = build_optimizer(config.optimizer, strategy.param_groups(model, config.lr, config.weight_decay))
        return _sft_trainer(model, config, tokenizer, scratch_dir, train=prepared.train, evaluation=prepared.selection,
                            optimizers=(optimizer, None), callbacks=callbacks)

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Loss and perplexity over the answer tokens of one split, then generation on its
        prompts (the first `max_generate_samples`), scored and kept."""
        from peftkit.trainer import evaluate_once

        # SFTTrainer insists on a training set even to evaluate; it never trains here
        loss = evaluate_once(lambda scratch: _sft_trainer(model, config, tokenizer, scratch, train=prepared.splits[split],
                                                          evaluation=prepared.splits[split]))["loss"]
        metrics = language_model_loss(loss)
        chosen = rows_to_generate(prepared.raw[split], config)
        if len(chosen) == 0:
            return Evaluation(metrics)
        conversations = [row["messages"][:-1] for row in chosen]
        references = [row["references"] for row in chosen]  # the answer, or every reference the data gives
        replies = generate(model, tokenizer, conversations, config.max_new_tokens, config.eval_batch_size)
        generated = [reply.text for reply in replies]
        metrics |= score_generations(generated, references, prepared.info.get("answer_format", "text"))
        predictions = [{"prompt": c[-1]["content"], "reference": r[0], "references": r, "generated": g.text,
                        "finished": g.finished} for c, r, g in zip(conversations, references, replies)]
        return Evaluation(metrics, predictions, generation_summary(replies, config.max_new_tokens, split))

    def answer(self, model: nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
               batch_size: int) -> list[Reply]:
        return generate(model, tokenizer, conversations, max_new_tokens, batch_size)


def _sft_trainer(model: nn.Module, config: RunConfig, tokenizer: Any, scratch_dir: str, train: Any, evaluation: Any,
                 **kwargs: Any) -> Any:
    """TRL's SFTTrainer on already tokenized data (input_ids, labels), with peftkit's timing."""
    from trl import SFTConfig, SFTTrainer

    from peftkit.trainer import Timed, training_arguments

    class TimedSFTTrainer(Timed, SFTTrainer):
        pass

    score_answer_positions_only()

    args = training_arguments(config, scratch_dir, group_by_length=config.group_by_length and not config.packing,
                              args_class=SFTConfig, max_length=config.max_length, packing=config.packing,
                              packing_strategy="bfd", eval_packing=False, shuffle_dataset=False)
    return TimedSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                           processing_class=tokenizer, **kwargs)


def score_answer_positions_only() -> None:
    """Make TRL's fused LM head score only the positions that carry a label, on every device.

    TRL (1.16) projects only labelled positions through the vocabulary where its Triton kernels
    run, and every position elsewhere, so that compiled tile shapes stay fixed on XLA devices;
    masked positions are then zeroed. On CPU, eager like CUDA, that is only wasted work: the LM
    head is a fifth of SmolLM2-135M's FLOPs, and sst2-chat's answers are about 3 of 63 tokens.
    The loss and every gradient are the same either way (tests/test_sft.py)."""
    import trl.trainer.utils as fused_head
    from trl.kernels.chunked_logprob import _use_triton

    fused_head._use_triton = lambda device: device.type in ("cpu", "cuda") or _use_triton(device)


CHAT_ROLES = ("system", "user", "assistant")  # OpenAI messages; "tool" turns are refused (their format varies by template)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
JSON_NAMES = {type(None): "null", int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object"}
PLACEHOLDER = re.compile(r"\{(prompt|instruction|input)\}")


def _columns(config: RunConfig, defaults: dict[str, str], train: Any) -> tuple[str, dict[str, str]]:
    """The data format (messages, sharegpt, alpaca, prompt-completion) and its columns: the
    config's names, else the data set's, else whichever layout the training file has. A prompt
    column named `instruction` beside an `input` column is Alpaca, so the input is joined, not
    dropped."""
    available = train.column_names

    def pick(role: str) -> str | None:
        return getattr(config, f"{role}_column") or defaults.get(f"{role}_column")

    if pick("messages"):
        return _chat_format(train, pick("messages"))
    if pick("prompt") or pick("completion"):
        prompt, completion = pick("prompt") or "prompt", pick("completion") or "completion"
        if prompt == "instruction" and "input" in available:
            return "alpaca", {"instruction": prompt, "input": "input", "output": completion}
        return "prompt-completion", {"prompt": prompt, "completion": completion}
    if "messages" in available:
        return _chat_format(train, "messages")
    if "prompt" in available and "completion" in available:
        return "prompt-completion", {"prompt": "prompt", "completion": "completion"}
    if "conversations" in available:
        return _chat_format(train, "conversations")
    if "instruction" in available and "output" in available:
        return "alpaca", {"instruction": "instruction", **({"input": "input"} if "input" in available else {}),
                          "output": "output"}
    raise PeftkitError(f"cannot tell the chat layout (columns: {', '.join(available)}): sft reads 'messages' "
                       "({role, content}), 'conversations' ({from, value}), 'instruction' and 'output' (Alpaca) or "
                       "'prompt' and 'completion' columns; name yours with --set messages_column=... or "
                       "--set prompt_column=... --set completion_column=...")


def _chat_format(train: Any, column: str) -> tuple[str, dict[str, str]]:
    """A column of turns is ShareGPT where its first turn has `from`, else OpenAI messages."""
    first = train[0].get(column) if column in train.column_names and len(train) else None
    turn = first[0] if isinstance(first, list) and first else None
    if isinstance(turn, dict) and turn.get("from") is not None:
        return "sharegpt", {"conversations": column}
    return "messages", {"messages": column}


def _check_template(template: str | None, data_format: str, columns: dict[str, str]) -> None:
    """A prompt_template must say where each part of the prompt goes, so none is lost."""
    if template is None:
        return
    used = set(PLACEHOLDER.findall(template))
    if data_format in ("messages", "sharegpt"):
        raise PeftkitError("prompt_template formats a prompt column, and this data has chat messages: drop it")
    if data_format == "prompt-completion" and used != {"prompt"}:
        raise PeftkitError(f"prompt_template must mark the prompt with {{prompt}} (it has "
                           f"{', '.join('{' + p + '}' for p in sorted(used)) or 'no placeholder'}); {{instruction}} "
                           "and {input} are for Alpaca data (instruction, input, output)")
    if data_format == "alpaca" and not ({"prompt"} <= used or {"instruction", "input"} <= used
                                        or (used == {"instruction"} and "input" not in columns)):
        raise PeftkitError("prompt_template must place the instruction and the input ({instruction} and {input}), "
                           "or the two joined ({prompt}), so that no part of an Alpaca example is dropped")


def _describe(data_format: str, columns: dict[str, str], template: str | None, config: RunConfig) -> str:
    """The detected format in words, for the line printed as data loads."""
    if data_format == "messages":
        return f"column '{columns['messages']}' of {{role, content}}; roles {', '.join(CHAT_ROLES)}"
    if data_format == "sharegpt":
        return f"column '{columns['conversations']}' of {{from, value}}; human -> user, gpt -> assistant, system -> system"
    through = "; the prompt through prompt_template" if template else ""
    if data_format == "prompt-completion":
        return f"'{columns['prompt']}' -> user, '{columns['completion']}' -> assistant{through}"
    parts = " + ".join(columns.values())
    if "input" not in columns:
        return f"{parts}; no input column{through}"
    how = ("prompt_template places the instruction and input" if template and "{prompt}" not in template
           else "input joined after the instruction" + through)
    if config.prompt_column == "instruction":
        how += "; prompt_column=instruction, and the data's 'input' column is joined too, not dropped"
    return f"{parts}; {how}"


def _example(row: dict[str, Any], data_format: str, columns: dict[str, str], template: str | None,
             references_column: str | None, split: str, index: int) -> dict[str, Any]:
    """One example: its chat `messages` and the `references` its generation is scored against
    (the assistant's answer, or the list in `references_column` where the data has one)."""
    messages = _conversation(row, data_format, columns, template, split, index)
    return {"messages": messages, "references": references_of(row, references_column, messages[-1]["content"], split, index)}


def _conversation(row: dict[str, Any], data_format: str, columns: dict[str, str], template: str | None, split: str,
                  index: int) -> list[dict[str, str]]:
    """One example as chat messages, checked: roles known and text present, the last turn the
    assistant's. A prompt is put into `template` ({prompt}, or Alpaca's {instruction} and
    {input}) when given."""
    if data_format == "prompt-completion":
        prompt, completion = row[columns["prompt"]], row[columns["completion"]]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise PeftkitError(f"{split} row {index}: prompt and completion must be text")
        messages = [{"role": "user", "content": _fill(template, {"prompt": prompt})},
                    {"role": "assistant", "content": completion}]
    elif data_format == "alpaca":
        messages = _alpaca(row, columns, template, split, index)
    elif data_format == "sharegpt":
        messages = _turns(row[columns["conversations"]], ("from", "value"), SHAREGPT_ROLES, split, index)
    else:
        messages = _turns(row[columns["messages"]], ("role", "content"), {r: r for r in CHAT_ROLES}, split, index)
    if messages[-1]["role"] != "assistant":
        raise PeftkitError(f"{split} row {index}: the last message must be the assistant's answer "
                           f"(got role '{messages[-1]['role']}'): every example needs an assistant turn to learn")
    return messages


def _fill(template: str | None, values: dict[str, str]) -> str:
    """`template` with each {name} replaced in one pass (text that holds "{input}" stays as it is);
    without a template, the prompt itself."""
    if template is None:
        return values["prompt"]
    return PLACEHOLDER.sub(lambda match: values[match[1]], template)


def _alpaca(row: dict[str, Any], columns: dict[str, str], template: str | None, split: str,
            index: int) -> list[dict[str, str]]:
    """An Alpaca example as a user turn and an assistant turn: the instruction, then a blank
    line and the input where there is one (Alpaca's own layout), unless `template` places them."""
    for part, column in columns.items():
        value = row.get(column)
        if not isinstance(value, str) and not (part == "input" and value is None):
            got = JSON_NAMES.get(type(value), type(value).__name__)
            raise PeftkitError(f"{split} row {index}: Alpaca's {part} ('{column}') must be text"
                               f"{' or empty' if part == 'input' else ''}, not {got}")
    instruction, output = row[columns["instruction"]], row[columns["output"]]
    given = (row[columns["input"]] or "") if "input" in columns else ""
    joined = f"{instruction}\n\n{given}" if given.strip() else instruction
    prompt = _fill(template, {"prompt": joined, "instruction": instruction, "input": given})
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


ROLE_HINTS = {("role", "human"): " (ShareGPT's human/gpt are read from {from, value} turns: a 'conversations' column)",
              ("role", "gpt"): " (ShareGPT's human/gpt are read from {from, value} turns: a 'conversations' column)",
              ("role", "tool"): " (tool turns are not trained on: their layout depends on the chat template)"}


def _turns(turns: Any, keys: tuple[str, str], roles: dict[str, str], split: str, index: int) -> list[dict[str, str]]:
    """Chat turns of `keys` (role and text: OpenAI's role/content, ShareGPT's from/value) as
    messages, each role mapped by `roles`; an unknown one is refused with its row."""
    who, said = keys
    if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get(who), str) and isinstance(t.get(said), str) for t in turns):
        column = "messages" if who == "role" else "conversations"
        raise PeftkitError(f"{split} row {index}: {column} must be a non-empty list of {{{who}, {said}}} with text values")
    for number, turn in enumerate(turns):
        if turn[who] not in roles:
            raise PeftkitError(f"{split} row {index}: message {number} has {who} '{turn[who]}', which is not one of "
                               f"{', '.join(roles)}{ROLE_HINTS.get((who, turn[who]), '')}")
    return [{"role": roles[t[who]], "content": t[said]} for t in turns]


def set_chat_template(tokenizer: Any, template: str | None) -> None:
    """Use the given template (a file path or the template text), else the tokenizer's own."""
    if template is not None:
        path = Path(template).expanduser()
        if "{" not in template and not path.is_file():
            raise PeftkitError(f"chat_template {template} is neither a readable file nor template text")
        tokenizer.chat_template = path.read_text() if "{" not in template else template
    if not getattr(tokenizer, "chat_template", None):
        raise PeftkitError("the model's tokenizer has no chat template: pass one with --set chat_template=FILE.jinja "
                           "(or the template text)")


def _untruncated_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of the whole rendered conversation (asked only of one that fills max_length)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels that are -100 except on assistant
    turns (their text and the template's end-of-turn marks, up to the next turn).

    Each assistant turn is located by rendering the conversation up to it with the generation
    prompt (where the answer starts) and up to its end (where it stops); tokens are labeled by
    their character offsets, so no tokenizer boundary effect can shift the mask."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(end) and end.startswith(start)):
            raise PeftkitError("the chat template does not render a conversation's beginning as a prefix of the whole "
                               "conversation, so the assistant's turns cannot be located: use another chat_template")
        spans.append((len(start), len(end)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
    labels = [token if any(lo <= begin < hi for lo, hi in spans) else -100
              for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels


def generate(model: nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int) -> list[Reply]:
    """Greedy answers to conversations (each ends before the assistant's turn), batched by
    prompt length with left padding; decoding stops at the end-of-turn or end-of-text token,
    else at `max_new_tokens` (the reply then says it did not finish)."""
    import torch

    encoded = encode_prompts(tokenizer, conversations)
    stop = [t for t in {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
            if t is not None]
    answers: dict[int, Reply] = {}
    model.eval()
    for chunk in generation_batches(encoded, batch_size):
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop or None,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True)
        for row, index in enumerate(chunk):
            tokens = out[row, width:].tolist()
            answers[index] = Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                   finished=len(tokens) < max_new_tokens or any(t in stop for t in tokens))
    return [answers[i] for i in range(len(encoded))]


def encode_prompts(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Each conversation's token ids up to the assistant's turn (the generation prompt)."""
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def generation_batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    """The indices of each batch `generate` runs: prompts sorted by length, `batch_size` at a time."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    return [order[first: first + batch_size] for first in range(0, len(order), batch_size)]


def largest_generation_batch(splits: list[list[list[int]]], batch_size: int, max_new_tokens: int) -> dict[str, int]:
    """Of the batches `generate` runs on each split's prompts (token ids), the one whose
    key/value cache is largest (rows x (longest prompt + new tokens)): the peak of generation,
    which the estimate counts (`generation_batch` in a run's record)."""
    shapes = [(len(chunk), max(len(encoded[i]) for i in chunk))
              for encoded in splits for chunk in generation_batches(encoded, batch_size)]
    rows, prompt = max(shapes, key=lambda shape: shape[0] * (shape[1] + max_new_tokens), default=(0, 0))
    return {"rows": rows, "prompt_tokens": prompt}


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def gsm8k_answer(text: str) -> str:
    """The final number of a GSM8K-style answer: after `####`, else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else ""


def score_generations(generated: list[str], references: list[list[str]], answer_format: str = "text") -> dict[str, float]:
    """Exact match (normalized text, or the final number for `gsm8k`), ROUGE-1/2/L and corpus
    BLEU, each against every reference of an example (peftkit.text_metrics)."""

    if answer_format == "gsm8k":
        matches = [any(gsm8k_answer(g) == gsm8k_answer(r) != "" for r in refs) for g, refs in zip(generated, references)]
    else:
        matches = [any(normalize_answer(g) == normalize_answer(r) for r in refs) for g, refs in zip(generated, references)]
    return {"exact_match": sum(matches) / len(matches), **rouge_scores(generated, references),
            "bleu": bleu_score(generated, references)}
