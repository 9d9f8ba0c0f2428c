"""Check evalkv's RULER data against RULER's own scripts: byte-identical rows, task by task and length by length.

Runs NVIDIA/RULER's `scripts/data/prepare.py` unchanged (`--tokenizer_type hf --model_template_type base`) for every
task and length, builds evalkv's rows for the same tokenizer, seed and data (`task=ruler task.chat_template=false`),
and compares the four fields RULER's prediction step reads: `input`, `outputs`, `length`, `answer_prefix`. Exits 1
when any row differs.

    python scripts/ruler_reference_check.py --ruler RULER_CHECKOUT --tokenizer TOKENIZER_DIR \
        --essays PaulGrahamEssays.json [--lengths 4096 8192] [--num-samples 5] [--work DIR]

With `--chat-template`, both sides wrap the task in the tokenizer's chat template: it is added to the scratch copy's
template.py as `evalkv-chat` (how RULER takes a new model's template), and evalkv's rows get the one documented
difference before the comparison: for niah tasks that ask one value, RULER re-words the wrapper too (`are` -> `is`,
...; evalkv/tasks/ruler/niah.py), so evalkv's wrapper is re-worded likewise. Any other difference counts.

RULER_CHECKOUT is a checkout of NVIDIA/RULER (the check was made at c3f5e3b); its `scripts/` folder is copied into
WORK because niah.py and qa.py read their data from `json/` beside themselves (the essays and the qa fixtures are put
there). The reference runs with `--reference-python` (default: this interpreter), which needs RULER's imports for
these scripts: nltk, wonderwords, numpy, scipy, pyyaml, tqdm, tenacity, transformers. Both sides find NLTK's
English Punkt through NLTK_DATA (prepare.py also looks for the old `tokenizers/punkt` folder and tries to download
it when absent; the scripts use `punkt_tab` either way). SQuAD and HotpotQA are not needed: qa_1 and qa_2 read
small fixtures in their formats, written here (deterministic; built from the essays' words), by both sides. RULER's
json/english_words.json is a Git LFS file that a plain checkout holds as a pointer; cwe.py loads it at import but
draws from it only beyond wonderwords' 8,166 words (not at 4K-8K), so without `--english-words FILE` an empty
stand-in takes its place (a cell that needed it would fail, not pass).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evalkv.tasks import build_task  # noqa: E402
from evalkv.tasks.ruler import REFERENCE_FIELDS, rows_digest  # noqa: E402
from evalkv.tasks.ruler.common import Frame, chat_frame  # noqa: E402
from evalkv.tasks.ruler.constants import RULER_TASKS  # noqa: E402
from evalkv.tasks.ruler.niah import singular  # noqa: E402


def qa_fixtures(words: list[str]) -> tuple[dict, list]:
    """A SQuAD v2 dev-shaped and a HotpotQA dev distractor-shaped data set: 40 articles x 4 paragraphs (every
    paragraph asks one question, one in four unanswerable), 60 questions x 4 documents (2 shared with another)."""
    draw = random.Random(0)

    def passage(size: int) -> str:
        start = draw.randrange(len(words) - size)
        return " ".join(words[start:start + size])

    articles = []
    for article in range(40):
        paragraphs = []
        for number in range(4):
            code = f"code-{article}-{number}-{draw.randrange(10**6)}"
            answerable = (article + number) % 4 != 3
            paragraphs.append({"context": f"{passage(90)} The passage code is {code}. {passage(30)}", "qas": [{
                "id": f"{article}-{number}", "question": f"What is the code of passage {article}.{number}?",
                "answers": [{"text": code, "answer_start": 0}] if answerable else [],
                "is_impossible": not answerable}]})
        articles.append({"title": f"Article {article}", "paragraphs": paragraphs})
    hotpot = []
    for item in range(60):
        gold = [f"Topic {item}", [f"{passage(40)} ", f"Topic {item} was made by Maker {item}."]]
        shared = [[f"Topic {(item + 1) % 60} notes", [passage(60)]], [f"Topic {(item + 2) % 60} notes", [passage(60)]]]
        hotpot.append({"_id": str(item), "question": f"Who made topic {item}?", "answer": f"Maker {item}",
                       "context": [gold, [f"Maker {item}", [passage(50)]], *shared]})
    return {"version": "v2.0", "data": articles}, hotpot


CHAT_TEMPLATE_NAME = "evalkv-chat"


def reference_rows(args, scripts: Path, task: str, length: int) -> list[dict] | None:
    """RULER's prepare.py for one task and length (it runs the task's generator with `python`: PATH leads to ours)."""
    out = args.work / "reference" / str(length)
    command = [args.reference_python, "prepare.py", "--save_dir", str(out), "--benchmark", "synthetic",
               "--task", task, "--tokenizer_path", str(args.tokenizer), "--tokenizer_type", "hf",
               "--max_seq_length", str(length),
               "--model_template_type", CHAT_TEMPLATE_NAME if args.chat_template else "base",
               "--num_samples", str(args.num_samples), "--random_seed", str(args.seed)]
    env = {**os.environ, "PATH": f"{Path(args.reference_python).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=scripts / "data", env=env, capture_output=True, text=True)
    file = out / task / "validation.jsonl"
    if not file.is_file():
        print(f"RULER's prepare.py wrote no {file}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def evalkv_rows(args, tokenizer, squad: Path, hotpot: Path) -> dict[tuple[str, int], list[dict]]:
    task = build_task("ruler", {"tasks": args.tasks, "lengths": args.lengths, "num_samples": args.num_samples,
                                "seed": args.seed, "chat_template": args.chat_template,
                                "essay_path": str(args.essays), "squad_path": str(squad),
                                "hotpotqa_path": str(hotpot), "cache_dir": str(args.work / "evalkv-cache"),
                                "cwe_words_path": str(args.english_words) if args.english_words else None})
    return {(name, length): rows for name, length, rows in task.generated(tokenizer)}


def add_chat_template(scripts: Path, frame: Frame) -> None:
    """The tokenizer's chat wrapper as a RULER template (braces doubled: RULER formats it)."""
    def escaped(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    template = escaped(frame.prefix) + "{task_template}" + escaped(frame.suffix)
    with open(scripts / "data" / "template.py", "a", encoding="utf-8") as file:
        file.write(f"\nTemplates[{CHAT_TEMPLATE_NAME!r}] = {template!r}\n")


def with_rulers_rewording(rows: list[dict], task: str, frame: Frame) -> list[dict]:
    """evalkv's rows with the wrapper re-worded as niah.py re-words it when one value is asked for."""
    args = RULER_TASKS[task].args
    if RULER_TASKS[task].family != "niah" or args["num_needle_q"] * args["num_needle_v"] != 1:
        return rows
    reworded = []
    for row in rows:
        body = row["input"][len(frame.prefix):len(row["input"]) - len(frame.suffix)]
        assert frame.wrap(body) == row["input"]
        reworded.append({**row, "input": singular(frame.prefix) + body + singular(frame.suffix)})
    return reworded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ruler", type=Path, required=True, help="a checkout of NVIDIA/RULER (holds scripts/)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Hugging Face tokenizer folder")
    parser.add_argument("--essays", type=Path, required=True, help="RULER's PaulGrahamEssays.json")
    parser.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), help="default: all 13")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--num-samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=Path("ruler-reference-check"), help="scratch folder")
    parser.add_argument("--reference-python", default=sys.executable, help="the interpreter that runs RULER")
    parser.add_argument("--jobs", type=int, default=2, help="reference runs at a time")
    parser.add_argument("--chat-template", action="store_true", help="wrap with the tokenizer's chat template")
    parser.add_argument("--english-words", type=Path, help="RULER's json/english_words.json (the LFS file), for cwe")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if not (args.ruler / "scripts" / "data" / "prepare.py").is_file():
        sys.exit(f"{args.ruler} is not a RULER checkout (no scripts/data/prepare.py)")
    scripts = args.work / "ruler-scripts"
    shutil.rmtree(scripts, ignore_errors=True)
    shutil.rmtree(args.work / "reference", ignore_errors=True)
    shutil.copytree(args.ruler / "scripts", scripts)
    data = scripts / "data" / "synthetic" / "json"
    shutil.copyfile(args.essays, data / "PaulGrahamEssays.json")
    words = re.sub(r"\s+", " ", json.loads(args.essays.read_text(encoding="utf-8"))["text"]).split(" ")
    squad, hotpot = qa_fixtures(words)
    (data / "squad.json").write_text(json.dumps(squad), encoding="utf-8")
    (data / "hotpotqa.json").write_text(json.dumps(hotpot), encoding="utf-8")
    if args.english_words:
        shutil.copyfile(args.english_words, data / "english_words.json")
    elif (data / "english_words.json").read_bytes().startswith(b"version https://git-lfs"):
        (data / "english_words.json").write_text("{}", encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=True)
    ours = evalkv_rows(args, tokenizer, data / "squad.json", data / "hotpotqa.json")
    if args.chat_template:
        frame = chat_frame(tokenizer, str(args.tokenizer))
        add_chat_template(scripts, frame)
        ours = {(task, length): with_rulers_rewording(rows, task, frame) for (task, length), rows in ours.items()}
    cells = [(task, length) for length in args.lengths for task in args.tasks]
    with ThreadPoolExecutor(args.jobs) as pool:
        theirs = dict(zip(cells, pool.map(lambda cell: reference_rows(args, scripts, *cell), cells)))

    failed = False
    print("| task | length | identical rows | sha256 of the rows (input, outputs, length, answer_prefix) |")
    print("|---|---|---|---|")
    for task, length in cells:
        mine, reference = ours[task, length], theirs[task, length]
        if reference is None:
            failed = True
            print(f"| {task} | {length} | RULER's script failed (its output above) | - |")
            continue
        same = sum(all(a[key] == b[key] for key in REFERENCE_FIELDS) for a, b in zip(mine, reference))
        count = f"{same}/{len(reference)}" + ("" if len(mine) == len(reference) else f" (evalkv made {len(mine)})")
        failed |= same != len(reference) or len(mine) != len(reference)
        print(f"| {task} | {length} | {count} | {rows_digest(reference)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
