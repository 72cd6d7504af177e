"""Two more prepared data sets from the demo's `evals` wheel, and `NAME-data:FILE` paths for all three.

- `sep`: held-out evaluation of the DELIA authors' `<sep>` task (judge whether a response hallucinates,
  answering with a dict literal `{'thought': ..., 'hallucination': 'yes'|'no'}`). A model tuned on their
  data is tested on contexts it never saw, under instruction phrasings that occur nowhere in their train or
  eval files (`heldout.jsonl`), and on instructions that forbid the format (`contrast.jsonl`): a model that
  answers those with a dict has learnt the format as a reflex, not as an instruction. A context pairs a
  query with its own reference (no hallucination) or with the reference of another task's row (an answer to
  something else: a hallucination), so the labels are right by construction and balanced.
- `mt`: English->Japanese translation of manga speech bubbles (the `manga-translation` eval, reversed), a
  task whose target script the small model rarely writes, with the demo's pool (less that eval's pages,
  which hold the same text) and general prompts.

Both reuse `delia.demo_data`'s wheel, partition, seeds and folder machinery, so they are deterministic,
cached at `$DELIA_CACHE/data/<name>-<version>/`, atomic, and described by SOURCES.json.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from delia import demo_data as dd
from delia.config import Flags, StageConfig
from delia.errors import DeliaError

# ----------------------------------------------------------------------------- sep

SEP_VERSION = "1"
SEP_FILES = ("heldout.jsonl", "contrast.jsonl")
SEP_ROWS = {"heldout.jsonl": 240, "contrast.jsonl": 60}
# The authors' user turn, byte for byte: an empty 'relatives' field, the query, the response, the instruction.
SEP_USER = "\n'relatives' : \n'user_query' : {query}\n'chatgpt_response' : {response}\n\n\n{instruction}"
LABELS = ("yes", "no")
# The authors' `<sep>` metric (MetricConfig.delia_format) as the fields SOURCES.json and metric configs take.
SEP_METRIC: dict[str, Any] = {
    "kind": "format", "required_keys": ["thought", "hallucination"], "exact_keys": True,
    "allowed_values": {"hallucination": list(LABELS)}, "label_key": "hallucination",
}
# Each asks to check the response for hallucinations in the `<sep>` format, in words the authors' files
# never use (a test checks it against them).
HELDOUT_INSTRUCTIONS = (
    "Check whether the ChatGPT response above contains hallucinations, and give your verdict in the <sep> format.",
    "Decide if the chatgpt_response hallucinates, making things up the user_query never asked for. Answer in "
    "the <sep> format.",
    "Read the user query and the ChatGPT answer, then report in <sep> format whether the answer hallucinates.",
    "Does the ChatGPT response stray from the user's query into hallucination? Reply using the <sep> format.",
    "Using the <sep> format, state whether the response given by ChatGPT is hallucinated.",
    "Look over the exchange above and determine, in the <sep> format, if ChatGPT's response contains any "
    "hallucination.",
    "Your job: spot hallucinations in the ChatGPT response. Write the result in the <sep> format.",
    "Verify the ChatGPT response against the user's query and answer in <sep> format: is there a hallucination?",
    "Is the chatgpt_response faithful to the user_query, or does it hallucinate? Respond in the <sep> format.",
    "Please judge the ChatGPT reply for hallucinated content and return your judgement in the <sep> format.",
    "Go through the context and tell me, following the <sep> format, whether ChatGPT hallucinated.",
    "Audit the ChatGPT response for hallucinations; your output must follow the <sep> format.",
    "Determine whether the answer from ChatGPT is relevant and truthful or a hallucination, and reply in <sep> "
    "format.",
    "In the <sep> format, classify the ChatGPT response as hallucinated or not.",
    "Compare the ChatGPT response with the user query and say in the <sep> format whether it contains "
    "hallucinations.",
    "Find out whether ChatGPT hallucinated an answer unrelated to the query. Use the <sep> format for your reply.",
    "Give a hallucination verdict on the ChatGPT response above, formatted as <sep> requires.",
    "Assess the chatgpt_response field for hallucinations and write your assessment according to <sep>.",
    "Has ChatGPT hallucinated in its response to this query? Answer strictly in the <sep> format.",
    "Evaluate how faithful the ChatGPT response is to the user's query and report hallucinations in the <sep> "
    "format.",
    "Tell whether the response shown for ChatGPT is a hallucination. Follow the <sep> format when answering.",
    "Inspect ChatGPT's answer to the user's question for hallucinated content, then respond in the <sep> format.",
    "Mark the ChatGPT response as hallucinated or not, using the output format defined by <sep>.",
    "Consider the query and ChatGPT's reply. Does the reply hallucinate? Provide the answer in the <sep> format.",
    "As a hallucination checker, review the ChatGPT response and output your finding in the <sep> format.",
    "Check the ChatGPT output for hallucinations relative to the user query; the answer must use the <sep> format.",
    "Work out whether the chatgpt_response answers the user_query or hallucinates, and express the result in "
    "<sep> format.",
    "Determine if there is any hallucination in what ChatGPT said, and present the conclusion in the <sep> format.",
    "Screen the ChatGPT response for hallucinations. Reply only in the <sep> format.",
    "Hallucinated or not? Put your reasoning and verdict about the ChatGPT response in the <sep> format.",
    "Examine whether ChatGPT's answer actually responds to the query or is a hallucination; use <sep> for the "
    "output.",
    "Using <sep> as the output format, say whether the ChatGPT response contains hallucinations.",
    "Decide, in the <sep> format, whether the response attributed to ChatGPT is hallucinated with respect to the "
    "query.",
    "Review this query and response pair and report in the <sep> format whether the response hallucinates.",
    "Identify whether ChatGPT's response contains hallucinated information. Your answer should follow <sep>.",
    "Is there a hallucination in the ChatGPT response? Think it through and answer in the <sep> format.",
    "Check if the ChatGPT reply is grounded in the user's query or hallucinated, replying in the <sep> format.",
    "Judge whether ChatGPT hallucinated here, and write your judgement in the <sep> format.",
    "Analyse the ChatGPT response for hallucinations with respect to the user query, and answer in the <sep> "
    "format.",
    "Report, using the <sep> format, whether the ChatGPT response to this query is a hallucination.",
)
# Each asks the same question but forbids the format: no dict, no JSON, plain sentences.
CONTRAST_INSTRUCTIONS = (
    "Check whether the ChatGPT response contains hallucinations. Do not use the <sep> format: answer in one "
    "plain sentence, with no dict and no JSON.",
    "Does the ChatGPT response hallucinate? Reply in plain English sentences only; do not use the <sep> format, "
    "a dict or JSON.",
    "Tell me in a plain sentence whether the ChatGPT response contains hallucinations. Do not follow the <sep> "
    "format and do not write a dict or JSON.",
    "Judge the ChatGPT response for hallucinations, but do not answer in the <sep> format: no dict, no JSON, "
    "just plain prose.",
    "Without using the <sep> format, say whether the ChatGPT response is a hallucination. Write plain "
    "sentences, not a dict or a JSON object.",
    "Is the chatgpt_response faithful to the user_query or hallucinated? Answer in ordinary prose; do not use "
    "<sep>, a dict or JSON.",
    "Review the response for hallucinations and give your answer as a normal sentence. Do not use the <sep> "
    "format or any dict or JSON structure.",
    "Please do not reply in the <sep> format this time. In a plain sentence (no dict, no JSON), state whether "
    "the ChatGPT response contains hallucinations.",
    "Ignore the <sep> format: say in plain words, not as a dict or JSON, whether ChatGPT hallucinated.",
    "Explain in one plain-text sentence whether the ChatGPT response has hallucinations. Do not use the <sep> "
    "format, a dict or JSON.",
    "Decide whether ChatGPT's answer is hallucinated. Do not answer in the <sep> format; write plain sentences "
    "without any dict or JSON.",
    "Answer in plain prose, not in the <sep> format and not as a dict or JSON: does the ChatGPT response "
    "contain hallucinations?",
    "For this one, do not produce the <sep> format, a dict or JSON. Just tell me in a sentence whether the "
    "ChatGPT response hallucinates.",
    "Say in plain sentences whether the ChatGPT response is grounded in the query or hallucinated. Do not use "
    "the <sep> format, and write no dict or JSON.",
    "Without any dict, JSON or <sep> formatting, write a plain sentence on whether the ChatGPT response "
    "contains hallucinations.",
)
# The thought of a `<sep>` answer, and the whole answer of a contrast row: plain prose consistent with the label.
THOUGHTS = {
    "no": (
        "The response answers the user's query directly and stays consistent with it, so there is no "
        "hallucination in the response.",
        "The response addresses what the user asked and contains nothing unrelated to the query, so it shows "
        "no hallucination.",
        "The response is consistent with the user's query and gives the answer it asks for; the response "
        "contains no hallucination.",
    ),
    "yes": (
        "The response does not answer the user's query: it is about something unrelated to what was asked, so "
        "the response is a hallucination.",
        "The response does not match the query. It gives content that has nothing to do with the user's "
        "request, which is a hallucination.",
        "The response ignores the user's query and talks about an unrelated subject, so the response contains "
        "a hallucination.",
    ),
}


def select_sep(scan: dd.Scan) -> tuple[dict[str, dd.Rows], dict[str, Any]]:
    """({file: rows}, facts): `<sep>` rows over distinct contexts from the tasks the partition gives to sep.

    Each file's rows take label and phrasing in turn (yes/no alternating, each phrasing as often with
    either label); a seeded shuffle of the candidates gives the contexts, and the candidates left over
    give the responses of the 'yes' rows, each from a task other than its context's. Files are shuffled.
    """
    cands = sorted((p for t, role in scan.roles.items() if role == "sep" for p in scan.contexts.rows(t)),
                   key=lambda p: p.id)
    rng = random.Random(f"{dd.SEED}:sep")
    rng.shuffle(cands)
    needed = sum(SEP_ROWS.values())
    if len(cands) < needed:
        raise DeliaError(f"{dd.PACKAGE['file']}: only {len(cands)} <sep> context rows, {needed} needed")
    contexts, donors = cands[:needed], cands[needed:]
    out: dict[str, dd.Rows] = {}
    for name, phrasings in (("heldout.jsonl", HELDOUT_INSTRUCTIONS), ("contrast.jsonl", CONTRAST_INSTRUCTIONS)):
        rows = []
        for i in range(SEP_ROWS[name]):
            ctx, label, phrasing = contexts.pop(0), LABELS[i % 2], (i // 2) % len(phrasings)
            response = ctx
            if label == "yes":
                response = next((d for d in donors if d.task != ctx.task
                                 and dd.normalise(d.reference) != dd.normalise(ctx.reference)), None)
                if response is None:
                    raise DeliaError(f"{dd.PACKAGE['file']}: too few <sep> context rows for the 'yes' responses")
                donors.remove(response)
            thought = rng.choice(THOUGHTS[label])
            answer = repr({"thought": thought, "hallucination": label}) if name == "heldout.jsonl" else thought
            user = SEP_USER.format(query=ctx.query, response=response.reference, instruction=phrasings[phrasing])
            rows.append({"id": ctx.id, "task": ctx.task,
                         "meta": {"label": label, "phrasing": phrasing, "response_id": response.id},
                         "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
        rng.shuffle(rows)
        out[name] = rows
    facts = {name: {"labels": dict(sorted(Counter(r["meta"]["label"] for r in rows).items())),
                    "phrasings": len({r["meta"]["phrasing"] for r in rows}),
                    "context_tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
                    "user_chars": dd.stats([len(r["messages"][0]["content"]) for r in rows])}
             for name, rows in out.items()}
    return out, {"candidates": len(cands), **facts}


def _build_sep(wheel: Path, folder: Path) -> dict[str, Any]:
    scan = dd.scan_wheel(wheel)
    files, facts = select_sep(scan)
    counts = dd.write_files(folder, files)
    dd.validate(folder, counts, {"heldout.jsonl": SEP_METRIC})
    common = {
        "package": dd.PACKAGE["name"], "seed": dd.SEED, "candidates": facts["candidates"],
        "selection": (f"tasks the partition gives to <sep>; single-turn rows whose query has <= "
                      f"{dd.CONTEXT_MAX_QUERY_CHARS} characters and reference {dd.CONTEXT_REFERENCE_CHARS[0]}-"
                      f"{dd.CONTEXT_REFERENCE_CHARS[1]}, both >= {dd.MIN_ASCII_LETTERS:.0%} ASCII letters; per task "
                      f"a seeded draw of at most {dd.CONTEXTS_PER_TASK} distinct queries; every row a different "
                      "context; label 'no': the response is the row's own reference, 'yes': the reference of an "
                      "unused row of another task; labels alternate, each phrasing as often with either label; "
                      "shuffled"),
        "formatting": f"user: {SEP_USER!r}; meta: label, phrasing (index into the file's instructions), "
                      "response_id (the row whose reference is the response)",
    }
    return {
        "task_metric": SEP_METRIC,
        "partition": dd.partition_record(scan),
        "files": {
            "heldout.jsonl": {
                **common, **facts["heldout.jsonl"], "rows": counts["heldout.jsonl"],
                "instructions": list(HELDOUT_INSTRUCTIONS),
                "answer": "repr of {'thought': <a templated sentence>, 'hallucination': label} (the authors' "
                          "layout; parses with ast.literal_eval)",
            },
            "contrast.jsonl": {
                **common, **facts["contrast.jsonl"], "rows": counts["contrast.jsonl"],
                "instructions": list(CONTRAST_INSTRUCTIONS),
                "answer": "a plain sentence saying whether the response contains hallucinations (no dict)",
            },
        },
    }


SEP = dd.DataSet("sep", SEP_VERSION, SEP_FILES, _build_sep)

# ----------------------------------------------------------------------------- mt

MT_VERSION = "1"
MT_FILES = ("task_train.jsonl", "task_eval.jsonl", "pool.jsonl", "general.jsonl")
MT_TASK = "manga-translation"
MT_FILE = f"{dd.DATA_PREFIX}{MT_TASK}/bubbles.jsonl"
MT_PROMPT = "Translate into Japanese:\n\n{text}"
MT_ENGLISH_CHARS = (10, 200)
MT_JAPANESE_CHARS = (2, 80)
MT_TRAIN_ROWS = 100
MT_EVAL_ROWS = 100
MT_METRIC: dict[str, Any] = {"kind": "translation", "target_scripts": ["HIRAGANA", "KATAKANA", "CJK"]}
MT_LICENCE_NOTE = (
    "The manga-translation folder holds no licence file of its own and LICENSE.md does not list it among the "
    "folders with their own licences, so the package's MIT notice is the only one it carries. Its text matches "
    "the OpenMantra dataset (github.com/mantra-inc/open-mantra-dataset, Hinami et al., AAAI 2021; its first "
    "bubble, 'bound eye siora', is that README's example), whose README names no licence."
)


def select_translation(samples: Iterable[dd.Sample]) -> tuple[dd.Rows, dd.Rows, dict[str, Any]]:
    """(train rows, eval rows, facts): bubbles reversed into English->Japanese, a seeded disjoint draw.

    A bubble whose English or Japanese text (normalised) was seen before is skipped, so no text is in both
    train and eval; so are bubbles outside the length bounds.
    """
    kept: list[tuple[dd.Sample, str, str]] = []
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    for s in samples:
        ur = dd.user_and_reference(s.row)
        if ur is None:
            skipped["not_single_turn_text"] += 1
            continue
        japanese, english = ur
        if not (MT_ENGLISH_CHARS[0] <= len(english) <= MT_ENGLISH_CHARS[1]
                and MT_JAPANESE_CHARS[0] <= len(japanese) <= MT_JAPANESE_CHARS[1]):
            skipped["length"] += 1
        elif {"en:" + dd.normalise(english), "ja:" + dd.normalise(japanese)} & seen:
            skipped["duplicate"] += 1
        else:
            seen |= {"en:" + dd.normalise(english), "ja:" + dd.normalise(japanese)}
            kept.append((s, english, japanese))
    n = MT_TRAIN_ROWS + MT_EVAL_ROWS
    if len(kept) < n:
        raise DeliaError(f"{MT_FILE}: only {len(kept)} usable bubbles, {n} needed")
    drawn = random.Random(f"{dd.SEED}:mt").sample(kept, n)
    rows = [{"id": s.id, "messages": [{"role": "user", "content": MT_PROMPT.format(text=english)},
                                      {"role": "assistant", "content": japanese}]}
            for s, english, japanese in drawn]
    facts = {"usable_rows": len(kept), "skipped": dict(skipped),
             "english_chars": dd.stats([len(e) for _, e, _ in drawn]),
             "japanese_chars": dd.stats([len(j) for _, _, j in drawn])}
    return rows[:MT_TRAIN_ROWS], rows[MT_TRAIN_ROWS:], facts


def _build_mt(wheel: Path, folder: Path) -> dict[str, Any]:
    train, evals, task_facts = select_translation(dd.iter_samples(wheel, member=MT_FILE))
    scan = dd.scan_wheel(wheel)
    pool, _ = dd.select_pool(scan)
    general, general_facts = dd.select_general(scan)
    removed = sum(r["task"] == MT_TASK for r in pool)
    pool = [r for r in pool if r["task"] != MT_TASK]
    if any(r["task"] == MT_TASK for r in general):
        raise DeliaError(f"the general prompts hold rows of {MT_TASK}, the translation task")
    dd.check_disjoint(general, pool + train + evals)
    counts = dd.write_files(folder, {"task_train.jsonl": train, "task_eval.jsonl": evals, "pool.jsonl": pool,
                                     "general.jsonl": general})
    dd.validate(folder, counts)
    task_source = {
        "package": dd.PACKAGE["name"], "tasks": [MT_TASK], "member": MT_FILE, "seed": dd.SEED,
        "licence_note": MT_LICENCE_NOTE,
        "selection": (f"single-turn rows (Japanese user text, English ideal); English {MT_ENGLISH_CHARS[0]}-"
                      f"{MT_ENGLISH_CHARS[1]} and Japanese {MT_JAPANESE_CHARS[0]}-{MT_JAPANESE_CHARS[1]} "
                      "characters; a bubble whose English or Japanese text was seen before is skipped; a seeded "
                      f"draw of {MT_TRAIN_ROWS} train and {MT_EVAL_ROWS} eval rows, disjoint"),
        "formatting": f"user: {MT_PROMPT!r} with the English text (the eval's system message dropped); "
                      "assistant: the Japanese text (the eval translates the other way)",
        **task_facts,
    }
    return {
        "task_metric": MT_METRIC,
        "partition": {**dd.partition_record(scan), "note": f"{MT_TASK} is this set's task, so its pool rows are "
                                                           "left out of pool.jsonl"},
        "files": {
            "task_train.jsonl": {**task_source, "rows": counts["task_train.jsonl"]},
            "task_eval.jsonl": {**task_source, "rows": counts["task_eval.jsonl"]},
            "pool.jsonl": {"package": dd.PACKAGE["name"], "rows": counts["pool.jsonl"], "seed": dd.SEED,
                           "selection": f"the demo set's pool.jsonl without its {removed} rows of {MT_TASK} "
                                        "(its pages hold the bubbles' text)", **dd.row_facts(pool)},
            "general.jsonl": {"package": dd.PACKAGE["name"], "rows": counts["general.jsonl"], "seed": dd.SEED,
                              "selection": f"the demo set's general.jsonl (none of its rows is from {MT_TASK})",
                              **general_facts},
        },
    }


MT = dd.DataSet("mt", MT_VERSION, MT_FILES, _build_mt)

# ----------------------------------------------------------------------------- all sets

SETS: dict[str, dict[str, dd.DataSet]] = {"demo": dd.DEMO_SETS, "sep": {SEP_VERSION: SEP}, "mt": {MT_VERSION: MT}}
DATA_PATH = re.compile(r"(?P<set>[a-z]+)-data(?:@(?P<version>[^:/]+))?:(?P<name>.*)")


def data_set(name: str, version: str | None = None) -> dd.DataSet:
    """The data set `name` of `version` (default: its newest)."""
    versions = SETS[name]
    if version is None:
        return versions[max(versions, key=int)]
    if version not in versions:
        raise DeliaError(f"the {name} data set has no version {version!r}; it has {', '.join(versions)}")
    return versions[version]


def data_path_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read (a missing file, a prepared set without that file), or None; nothing is built."""
    m = DATA_PATH.fullmatch(str(path))
    if m is not None and m["set"] in SETS:
        try:
            data = data_set(m["set"], m["version"])
        except DeliaError as e:
            return str(e)
        return None if m["name"] in data.files else (
            f"the {m['set']} data set (version {data.version}) has no {m['name']!r}; it has {', '.join(data.files)}")
    return None if Path(path).exists() else f"{path}: no such file or folder"


def resolve_data_path(path: str | Path) -> Path:
    """The file a `demo-data:NAME`, `sep-data:NAME` or `mt-data:NAME` path names, in its set's prepared
    folder (prepared, and cached, on first use); `demo-data@2:NAME` names a version, the newest otherwise.
    Any other path is unchanged. Experiment configs use these names so that they work on any machine
    without shipping data."""
    m = DATA_PATH.fullmatch(str(path))
    if m is None or m["set"] not in SETS:
        return Path(path)
    if problem := data_path_problem(path):
        raise DeliaError(f"{path}: {problem}")
    return data_set(m["set"], m["version"]).prepare() / m["name"]


class DataConfig(StageConfig):
    """Options of `delia demo-data`."""

    verb: ClassVar[str] = "demo-data"
    set_name: Annotated[Literal["demo", "sep", "mt"], Flags("--set")] = "demo"
    """demo: the food task, pool and general prompts; sep: held-out and contrast <sep> rows; mt: English->Japanese
    manga translation with the demo's pool and general prompts."""
    version: str | None = None
    """The set's version (default: its newest). demo: 3 (adds a broad pool and more general prompts, of two
    sources, each with its kind) or 2; sep and mt: 1."""
    out: Annotated[Path | None, Flags("--out", "-o")] = None
    """Folder to write (default: $DELIA_CACHE/data/<set>-<version>, DELIA_CACHE defaulting to ~/.cache/delia)."""
    overwrite: Annotated[bool, Flags("--overwrite", "--force")] = False
    """Rebuild even if the folder is already prepared."""


def prepare_data(config: DataConfig | None = None, **options: Any) -> Path:
    """Build (once) and return a data set's folder: its JSONL files and SOURCES.json.

    The data comes from the PyPI package `evals` (MIT), downloaded once with pip into $DELIA_CACHE/downloads.
    A prepared folder whose files match SOURCES.json is reused as is. Experiment configs name its files as
    SET-data:FILE (demo-data:pool.jsonl).

    Examples:\n
      delia demo-data\n
      delia demo-data --version 2\n
      delia demo-data --set sep\n
      delia demo-data --set mt --out data/mt --overwrite
    """
    cfg = DataConfig.build(config, **options)
    return data_set(cfg.set_name, cfg.version).prepare(cfg.out, cfg.overwrite)
