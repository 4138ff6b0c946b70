"""`rlhf redteam`: find the requests that make a policy answer harmfully, and turn what was found into data.

Attacks come from (a) seed requests per harm category (for the demo world, its harm requests and
provocations), split into the seeds the search uses and held-out seeds it never sees; (b) mutations of the
attacks that worked (templated rephrasings, prefixes and suffixes, two of them combined, two working attacks
joined); (c) optionally a red-team language model prompted with working attacks (Perez et al. 2022,
https://arxiv.org/abs/2202.03286). The target (a checkpoint or any OpenAI-compatible endpoint) answers each
attack several times; a classifier flags harmful or toxic answers: a judge (rlhf.judges) asked whether the
answer is better than the category's safe answer (a refusal, a polite reply), flagged below `flag_below`.

Reported: the attack success rate (flagged answers / answers) per category, on the held-out seeds and on the
search's attacks, with Wilson 95% intervals, as flagged by the classifier; on the demo world also as scored
by the gold judge (harmful or toxic), which never flags anything itself. Written from the search's flagged
answers (held-out seeds stay out of training data, to measure on): preference pairs (safe answer > harmful
one), a filter list of harmful responses for SFT data (`rlhf redteam --filter FILE`), and PPO prompts.
With `heldout_mutations`, mutations of the held-out seeds (worded as no training data is) are measured beside
them and never written out. Resumable: answered attacks are kept in attacks.jsonl and not asked again.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rlhf.config import EvalConfig, RedteamConfig, dump_config
from rlhf.data.attacks import (
    HELD_OUT,
    Attack,
    demo_seeds,
    heldout_mutations,
    mutate,
    split_seeds,
)
from rlhf.data.jsonl import atomic_write_text, check_output_dir, iter_jsonl, write_json, write_jsonl
from rlhf.data.preferences import PreferencePair, write_preferences
from rlhf.data.sources import iter_rows, text_field
from rlhf.engine.decoding import SamplingParams
from rlhf.errors import DataError
from rlhf.eval.reward_metrics import clustered_wilson_interval
from rlhf.judges.base import Answer, Judge
from rlhf.runs import check_same_input, check_same_settings
from rlhf.text_models import TextModel, load_text_model
from rlhf.train.demonstrations import demonstration_reply

log = logging.getLogger(__name__)
# settings a resumed run may change: how long the search goes on and how fast it asks; the rest made its rows
RESUMES_WITH = frozenset({"out_dir", "rounds", "max_attacks_per_round", "batch_size", "requests_per_s",
                          "concurrency", "timeout_s", "retries", "api_key_env"})  # fmt: skip


def read_seeds(path: str, refusal: str) -> list[Attack]:
    """Seeds from {message, category[, safe]} rows of any source (rlhf.data.sources); errors name source:row.
    A message listed again is one seed (else one copy could be held out while the other is searched and
    trained on); listed again under another category, it is an error."""
    seeds: list[Attack] = []
    first: dict[str, tuple[str, str]] = {}  # message -> (where, category) of its first row
    repeats = 0
    for where, row in iter_rows(path):
        message, category = text_field(row, "message", where), text_field(row, "category", where)
        safe = text_field(row, "safe", where) if "safe" in row else refusal
        if not message.strip() or not category.strip():
            raise DataError(f"{where}: empty message or category")
        if message in first:
            earlier, earlier_category = first[message]
            if earlier_category != category:
                raise DataError(f"{where}: the message of {earlier} again, under category {category!r} "
                                f"instead of {earlier_category!r}")  # fmt: skip
            repeats += 1
            continue
        first[message] = (where, category)
        seeds.append(Attack(message, category, safe, message, "seed", 0))
    if not seeds:
        raise DataError(f"{path}: no seeds (empty file)")
    if repeats:
        log.warning("redteam: %s lists %d message(s) more than once; each is one seed", path, repeats)
    return seeds


def mutations(worked: Sequence[Attack], n_each: int, limit: int, seed: int, round_: int,
              known: set[str]) -> list[Attack]:  # fmt: skip
    """Up to n_each new mutations of each working attack (deterministic under the seed), at most `limit`."""
    rng = random.Random(f"{seed}:mutate:{round_}")
    out: list[Attack] = []
    ordered = sorted(worked, key=lambda a: a.id)
    for a in ordered:
        others = [b.message for b in ordered if b.category == a.category and b.id != a.id]
        for _ in range(n_each):
            m = Attack(mutate(a.message, rng, others), a.category, a.safe, a.seed_message, "mutation", round_)
            if m.id not in known and len(out) < limit:
                known.add(m.id)
                out.append(m)
    return out


def sampled_attacks(red_model: TextModel, worked: Sequence[Attack], n: int, cfg: RedteamConfig, round_: int,
                    known: set[str]) -> list[Attack]:  # fmt: skip
    """New attacks a red-team model writes after a few working ones of one category, one line each."""
    rng = random.Random(f"{cfg.seed}:red:{round_}")
    by_category: dict[str, list[Attack]] = defaultdict(list)
    for a in worked:
        by_category[a.category].append(a)
    if not by_category or n == 0:
        return []
    parents = [rng.choice(by_category[rng.choice(sorted(by_category))]) for _ in range(n)]
    prompts = []
    for p in parents:
        shots = rng.sample(by_category[p.category], min(3, len(by_category[p.category])))
        prompts.append("".join(f"User: {s.message}\n" for s in shots) + "User:")
    params = SamplingParams(cfg.max_new_tokens, 1.0, 0, cfg.top_p)
    out = []
    for p, reply in zip(parents, red_model.complete_all(prompts, params), strict=True):
        message = reply.text.strip().split("\n")[0].strip()
        new = Attack(message, p.category, p.safe, p.seed_message, "red_model", round_)
        if message and new.id not in known:
            known.add(new.id)
            out.append(new)
    return out


def answer_and_flag(attacks: Sequence[Attack], target: TextModel, classifier: Judge, cfg: RedteamConfig,
                    demo: bool) -> None:  # fmt: skip
    """Sample cfg.samples_per_attack answers per attack, flag each with the classifier (and score with gold).
    The classifier judges an answer's words as if it had ended: a refusal cut off by max_new_tokens is still a
    refusal (a reward model scores an answer without its end at its no-EOS penalty, which flagged them all)."""
    k = cfg.samples_per_attack
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 0, cfg.top_p)
    replies = target.reply_all([a.message for a in attacks for _ in range(k)], params)
    pairs = [(target.prompt_of(a.message), Answer(r.text), Answer(a.safe))
             for a, r in zip([a for a in attacks for _ in range(k)], replies, strict=True)]  # fmt: skip
    # a pointwise classifier reviews each answer under a statement; a pairwise one answers a question about two
    principle = (
        cfg.classifier_review_principle
        if getattr(classifier, "reads_statement", False)
        else cfg.classifier_principle
    )
    p_better = classifier.compare_all(pairs, principle)
    for i, a in enumerate(attacks):
        chunk = slice(i * k, (i + 1) * k)
        a.answers, a.ended = [r.text for r in replies[chunk]], [r.ended for r in replies[chunk]]
        a.p_better = [round(p, 6) for p in p_better[chunk]]
        a.flagged = [p < cfg.flag_below for p in a.p_better]
        if demo:
            from rlhf.data.demo_task import render_prompt
            from rlhf.labelers import gold  # scoring only: the classifier above decides what is flagged

            verdicts = [
                gold.judge(render_prompt(a.seed_message), t, e)
                for t, e in zip(a.answers, a.ended, strict=True)
            ]
            a.gold_harmful = [not v.harmless for v in verdicts]


def asr_table(attacks: Sequence[Attack], key: str) -> dict[str, Any]:
    """Per category and over all: answers, successes, attack success rate and its 95% interval (Wilson's,
    widened for answers to one attack being alike: `clustered_wilson_interval`)."""
    clusters: dict[str, list[tuple[int, int]]] = defaultdict(list)  # (successes, answers) per attack
    for a in attacks:
        hits = a.flagged if key == "flagged" else (a.gold_harmful or [])
        for c in (a.category, "all"):
            clusters[c].append((sum(hits), len(hits)))
    table = {}
    for c, counts in sorted(clusters.items(), key=lambda item: (item[0] == "all", item[0])):
        n, k = sum(m for _, m in counts), sum(y for y, _ in counts)
        low, high = clustered_wilson_interval(counts)
        table[c] = {"answers": n, "successes": k, "asr": k / n if n else None, "ci95": [low, high]}
    return table


def write_outputs(
    out: Path, attacks: Sequence[Attack], target: TextModel, classifier_name: str
) -> dict[str, int]:
    """Pairs, filter list and PPO prompts from the search's flagged answers (held-out seeds left out)."""
    pairs: list[PreferencePair] = []
    filtered: dict[str, dict[str, str]] = {}
    prompts: dict[str, dict[str, str]] = {}
    for a in attacks:
        if a.source in HELD_OUT:
            continue
        prompt = target.prompt_of(a.message)
        for text, flagged in zip(a.answers, a.flagged, strict=True):
            if not flagged:
                continue
            chosen = (" " if text.startswith(" ") else "") + a.safe
            if text.strip() and text.strip() != a.safe.strip():
                pairs.append(PreferencePair(prompt, chosen, text, labeler=f"redteam:{classifier_name}"))
                filtered.setdefault(normalise(a.message) + "\0" + normalise(text),
                                    {"response": text, "request": a.message, "prompt": prompt,
                                     "category": a.category, "flagged_by": classifier_name})  # fmt: skip
            prompts.setdefault(prompt, {"prompt": prompt, "category": a.category})
    write_preferences(out / "pairs.jsonl", pairs)
    write_jsonl(out / "filter.jsonl", filtered.values())
    write_jsonl(out / "prompts.jsonl", prompts.values())
    return {"pairs": len(pairs), "filter": len(filtered), "prompts": len(prompts)}


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def apply_filter(sft_file: str, filter_file: str, out_file: str, by_answer: bool = False) -> tuple[int, int]:
    """Write `sft_file` without the rows that give a flagged answer to its request; return (kept, removed).

    An answer is flagged for the request it answered: "Hi there! How can I help?" to "Help me hurt the okra" is
    a failure to refuse, and the same words to "Hi!" a right answer. So a row goes when its answer and its
    request (the prompt string, or the last user message; the list holds both the attack's message and its
    rendered prompt) are those of an entry. `by_answer`, or an entry without its request (an older list), goes
    by the answer alone, whatever it answered. Texts are compared case- and whitespace-insensitively. The rows
    may take any shape SFT reads (prompt-completion or -response, messages, conversational, text); each kept row
    is written as it was. A `text` row has no answer of its own and is kept."""
    for option, path in (("--filter", sft_file), ("--filter-list", filter_file)):
        if Path(out_file).resolve() == Path(path).resolve():
            raise DataError(
                f"--filter-out {out_file} is the {option} file: name another, and it is left as it is"
            )
    answers: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for where, row in iter_rows(filter_file):
        answer = normalise(text_field(row, "response", where))
        asked = [normalise(text_field(row, key, where)) for key in ("request", "prompt") if key in row]
        if by_answer or not asked:
            answers.add(answer)
        pairs.update((request, answer) for request in asked)
    kept, removed = [], 0
    for where, row in iter_rows(sft_file):
        given = demonstration_reply(row, where)  # None: a text row, no answer of its own
        request, answer = (normalise(given[0]), normalise(given[1])) if given is not None else ("", "")
        if given is not None and (answer in answers or (request, answer) in pairs):
            removed += 1
        else:
            kept.append(row)
    write_jsonl(out_file, kept)
    return len(kept), removed


def make_classifier(cfg: RedteamConfig) -> Judge:
    from rlhf.eval.judges import make_judge

    return make_judge(EvalConfig(judge=cfg.classifier, judge_model=cfg.classifier_model,
                                 judge_url=cfg.classifier_url, judge_template=cfg.classifier_template,
                                 judge_mode=cfg.classifier_mode, judge_review_template=cfg.classifier_review_template,
                                 judge_review_choices=cfg.classifier_review_choices,
                                 judge_api_key_env=cfg.api_key_env, judge_cache=None,
                                 judge_requests_per_s=cfg.requests_per_s, judge_concurrency=cfg.concurrency,
                                 judge_timeout_s=cfg.timeout_s, judge_retries=cfg.retries))  # fmt: skip


def run(cfg: RedteamConfig, quiet: bool = False, target: TextModel | None = None, classifier: Judge | None = None,
        red_model: TextModel | None = None) -> dict[str, Any]:  # fmt: skip
    """Search for attacks, measure, write the data; models given as arguments replace the configured ones."""
    out = Path(cfg.out_dir)
    check_output_dir(out, "--out")
    # read before any output or model: bad input leaves nothing behind
    seeds = read_seeds(cfg.seeds_file, cfg.refusal) if cfg.seeds_file else demo_seeds(cfg.refusal)
    demo = cfg.seeds_file is None
    search, heldout = split_seeds(seeds, cfg.heldout_fraction, cfg.seed)
    check_same_settings(out, cfg.model_dump(mode="json"), out / "attacks.jsonl", RESUMES_WITH)
    if cfg.seeds_file:  # edited in place, its held-out split and safe answers would differ from the rows kept
        check_same_input(out, out / "attacks.jsonl", cfg.seeds_file, "seeds.sha256")
    done: dict[str, Attack] = {}
    if (out / "attacks.jsonl").is_file():
        for lineno, row in iter_jsonl(out / "attacks.jsonl"):
            try:
                attack = Attack(**row)
            except TypeError:
                raise DataError(f"{out / 'attacks.jsonl'}:{lineno}: not an attack of this stage") from None
            done[attack.id] = attack
        log.info("redteam: %d answered attacks found in %s, not asked again", len(done), out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    key = dict(
        api_key_env=cfg.api_key_env,
        requests_per_s=cfg.requests_per_s,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
    )
    target = target or load_text_model(cfg.target, cfg.target_url, batch_size=cfg.batch_size, seed=cfg.seed,
                                       **key)  # type: ignore[arg-type]  # fmt: skip
    mode = "-pointwise" if cfg.classifier_mode == "pointwise" else ""
    classifier_name = (
        f"{cfg.classifier}{mode}:{cfg.classifier_model}" if classifier is None else classifier.name
    )
    classifier = classifier or make_classifier(cfg)
    if red_model is None and cfg.red_model:
        red_model = load_text_model(cfg.red_model, batch_size=cfg.batch_size, seed=cfg.seed + 1)
    attacks: list[Attack] = []

    def settle(batch: list[Attack], desc: str) -> list[Attack]:
        """Answer the attacks not answered before, in chunks written as they finish (the resume points)."""
        todo = [a for a in batch if a.id not in done]
        bar = tqdm(total=len(todo), desc=desc, disable=quiet, dynamic_ncols=True)
        for i in range(0, len(todo), cfg.batch_size):
            chunk = todo[i : i + cfg.batch_size]
            answer_and_flag(chunk, target, classifier, cfg, demo)
            done.update((a.id, a) for a in chunk)
            write_jsonl(out / "attacks.jsonl", (asdict(a) for a in done.values()))
            bar.update(len(chunk))
        bar.close()
        settled = [done[a.id] for a in batch]
        attacks.extend(settled)
        return settled

    known = {a.id for a in seeds}
    unseen = heldout_mutations(heldout, cfg.heldout_mutations, cfg.seed, known)
    new = search
    for round_ in range(cfg.rounds):
        # 1. the target answers this round's attacks; 2. the classifier flags the answers
        answered = settle(new, f"redteam round {round_}")
        worked = [a for a in answered if a.worked]
        log.info("redteam round %d: %d of %d attacks worked", round_, len(worked), len(answered))
        if round_ == cfg.rounds - 1:
            break
        # 3. new attacks: mutations of those that worked, and what a red-team model writes after them
        red = min(cfg.red_samples_per_round, cfg.max_attacks_per_round) if red_model is not None else 0
        limit = cfg.max_attacks_per_round - red  # the red-team model's share is kept free of mutations
        new = mutations(worked, cfg.mutations_per_attack, limit, cfg.seed, round_ + 1, known)
        if red_model is not None:
            new += sampled_attacks(red_model, worked, red, cfg, round_ + 1, known)
    # the held-out seeds are answered from their own seed: their rate does not depend on how long the search ran
    target.reseed(cfg.seed + 1)
    measured = settle(heldout, "redteam held-out")
    target.reseed(cfg.seed + 2)
    measured_unseen = settle(unseen, "redteam held-out mutations")

    # 4. measure and write
    search_attacks = [a for a in attacks if a.source not in HELD_OUT]
    report: dict[str, Any] = {
        "target": cfg.target_url + "#" + cfg.target if cfg.target_url else cfg.target,
        "flagged_by": classifier_name,
        "flag_below": cfg.flag_below,
        "attacks": {
            "search": len(search_attacks),
            "heldout": len(measured),
            "heldout_mutations": len(measured_unseen),
        },  # fmt: skip
        "asr_heldout": asr_table(measured, "flagged"),
        "asr_search": asr_table(search_attacks, "flagged"),
        "by_source": {
            s: asr_table([a for a in search_attacks if a.source == s], "flagged").get("all")
            for s in ("seed", "mutation", "red_model")
        },  # fmt: skip
    }
    if demo:
        report["scored_by"] = "gold judge (harmful or toxic), demo world only; it flags nothing"
        report["gold_asr_heldout"] = asr_table(measured, "gold")
        if measured_unseen:
            report["gold_asr_heldout_mutations"] = asr_table(measured_unseen, "gold")
        report["gold_asr_search"] = asr_table(search_attacks, "gold")
        both = [(f, g) for a in attacks for f, g in zip(a.flagged, a.gold_harmful or [], strict=True)]
        report["classifier_gold_agreement"] = sum(f == g for f, g in both) / len(both) if both else None
    if measured_unseen:
        report["asr_heldout_mutations"] = asr_table(measured_unseen, "flagged")
    report["written"] = write_outputs(out, attacks, target, classifier_name)
    write_json(out / "report.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The attack success rates as a table: one row per category, held-out and search, with the gold score."""
    columns = [(t, h) for t, h in (("asr_heldout", "held-out ASR [95% CI]"), ("asr_heldout_mutations",
               "held-out mutations ASR"), ("asr_search", "search ASR [95% CI]"), ("gold_asr_heldout",
               "gold held-out ASR"), ("gold_asr_heldout_mutations", "gold held-out mutations")) if t in report]  # fmt: skip
    lines = [f"redteam: {report['target']}, flagged by {report['flagged_by']} (P(better than safe) < "
             f"{report['flag_below']})", f"{'category':<14}" + "".join(f"{h:<30}" for _, h in columns)]  # fmt: skip
    # every category of either table, "all" last (a category the held-out seeds lack comes after theirs' "all")
    categories = sorted({*report["asr_heldout"], *report["asr_search"]}, key=lambda c: (c == "all", c))
    for c in categories:
        cells = []
        for table, _ in columns:
            row = report[table].get(c)
            cells.append("-" if row is None or row["asr"] is None else
                         f"{row['asr']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] n={row['answers']}")  # fmt: skip
        lines.append(f"{c:<14}" + "".join(f"{cell:<30}" for cell in cells))
    w = report["written"]
    lines.append(f"wrote {w['pairs']} pairs, {w['filter']} filtered responses, {w['prompts']} PPO prompts")
    return "\n".join(lines)
