import ast
import hashlib
import random
from pathlib import Path

import rlhf
from rlhf.data import demo_task
from rlhf.labelers import gold


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kw = {"n_pretrain": 200, "n_sft": 50, "n_rl_prompts": 20, "n_eval_prompts": 20}
    demo_task.generate(tmp_path / "a", seed=7, **kw)
    demo_task.generate(tmp_path / "b", seed=7, **kw)
    demo_task.generate(tmp_path / "c", seed=8, **kw)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert len((tmp_path / "a" / "sft.jsonl").read_text().splitlines()) == 50


def test_gold_prefers_correct_polite_concise_ending_answers() -> None:
    p = demo_task.render_prompt("What is 3 plus 4?")
    best = gold.judge(p, "7.")
    assert best.correct and not best.rude and best.extra_words == 0 and best.utility == 2.0
    assert gold.judge(p, "3 plus 4 is 7.").utility == 2.0 - 4 * gold.W_EXTRA_WORD  # 5 words vs 1
    assert not gold.judge(p, "3 plus 4 is 8.").correct
    rude = gold.judge(p, "7. Obviously, you fool.")
    assert rude.rude and rude.utility < gold.judge(p, "3 plus 4 is 8.").utility  # rude is worse than wrong
    unended = gold.judge(p, "3 plus 4 is 7", ended=False)
    assert not unended.ended and unended.utility < 0.5
    assert gold.judge(p, "7. 7. 7.").repetitive
    fact = demo_task.render_prompt("What color is the zorb?")
    assert gold.judge(fact, "The zorb is blue.").correct and not gold.judge(fact, "The zorb is red.").correct
    yes = demo_task.render_prompt("Is the zorb blue?")
    assert gold.judge(yes, "Yes.").correct and not gold.judge(yes, "No.").correct
    assert gold.judge(demo_task.render_prompt("Thanks!"), "You are welcome!").correct


def test_every_generated_question_parses_back_to_its_answer() -> None:
    rng = random.Random(0)
    for _ in range(500):
        q = demo_task.sample_question(rng)
        parsed = gold.parse_question(demo_task.render_prompt(q.text))
        assert (parsed.family, parsed.answer) == (q.family, q.answer)
        assert gold.judge(demo_task.render_prompt(q.text), demo_task.answer_templates(q, q.answer)[0]).correct


def source_of(module: str) -> Path | None:
    """The file of an rlhf module (or package), None for a name that is not one (a function, a class)."""
    base = Path(rlhf.__file__).parent.parent / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def rlhf_imports(module: str) -> set[str]:
    """The rlhf modules that `module`'s source imports anywhere (functions included), as dotted names."""
    path = source_of(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "rlhf" and source_of(m) is not None}


def test_training_code_never_imports_the_gold_judge() -> None:
    """Gold reaches training only as labels: no training stage imports the gold module, directly or through
    any module it imports, even inside a function."""
    stages = sorted(
        p.stem for p in (Path(rlhf.__file__).parent / "train").glob("*.py") if p.stem != "__init__"
    )
    assert {"pretrain", "sft", "reward", "ppo"} <= set(stages)
    seen: set[str] = set()
    todo = [f"rlhf.train.{s}" for s in stages]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(rlhf_imports(module))
    assert "rlhf.models.loading" in seen  # the walk does follow imports
    assert "rlhf.labelers.gold" not in seen
    # and the walk would see it: the panel, which labels with gold, does import it
    assert "rlhf.labelers.gold" in rlhf_imports("rlhf.labelers.panel")
