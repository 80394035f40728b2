"""Scores of predicted text against reference text, shared by the tasks that produce text:
SQuAD v1.1's exact match and token F1 (extractive QA, instruction tuning), ROUGE-1/2/L
(`rouge-score`) and BLEU (`sacrebleu`). Where an example has several references, each score
takes the best of them (SQuAD's rule, and `rouge-score`'s `score_multi`); BLEU reads them as
reference streams, as sacrebleu does.
"""

from __future__ import annotations

import re
import string
from collections import Counter

PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1's F1 of the normalized tokens two answers share."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean exact match and F1 over examples, each the best over the example's references
    (SQuAD v1.1's evaluation script), as fractions."""
    exact = [max(normalize_answer(p) == normalize_answer(r) for r in refs) for p, refs in zip(predictions, references)]
    f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return {"exact_match": sum(exact) / len(exact), "f1": sum(f1) / len(f1)}


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Porter stemming), each the best over an
    example's references."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    names = {"rouge1": "rouge_1", "rouge2": "rouge_2", "rougeL": "rouge_l"}
    return {names[kind]: total / len(predictions) for kind, total in totals.items()}


def bleu_score(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing), 0-100. An
    example with fewer references than the most any has repeats its last one in the missing
    streams, which leaves its n-gram matches and closest reference length unchanged."""
    import sacrebleu

    streams = max(len(refs) for refs in references)
    padded = [refs + [refs[-1]] * (streams - len(refs)) for refs in references]
    return float(sacrebleu.corpus_bleu(predictions, [list(stream) for stream in zip(*padded)]).score)
