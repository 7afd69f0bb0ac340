"""lm-eval-harness tasks, scored block by block.

``prune-cli eval CHECKPOINT --tasks T1,T2`` and ``compress ... --eval-tasks T1,T2`` score tasks in
lm-eval's own format and with its own metrics, but the model's forward is prune-cli's block walk
(:class:`~prune_cli.streaming.driver.BlockDriver`), so a model larger than memory, a streamed checkpoint
and an activation-sparsity checkpoint (its sparsifiers installed per block) are scored the same
way, and in ``compress`` the dense and the compressed scores ride along walks the run makes
anyway (no reload, no second copy of the model).

lm-eval asks its model for answers (``loglikelihood(requests)``) inside ``simple_evaluate``; a
walk needs every token sequence before it starts. So scoring is three steps:

1. :meth:`TaskSuite.requests`: ``simple_evaluate`` with a recording model collects the
   ``(context, continuation)`` pairs the tasks ask about (deterministic for lm-eval's fixed seeds);
2. :class:`TaskStage` (a walk stage): each pair is tokenised as lm-eval's HF model does
   (trailing spaces of the context moved to the continuation; ``context + continuation``
   encoded whole and split after the context's tokens; the model's BOS first when its windows
   start with one; the last ``max_length`` tokens kept), pairs grouped by length into batches,
   and after the last block ``log p(continuation | context) = Σ_t log softmax(logits_t)[x_{t+1}]``
   over the continuation's positions, and whether every continuation token is the argmax;
3. :meth:`TaskSuite.results`: ``simple_evaluate`` again with a model that answers from the walk,
   so lm-eval computes its metrics and their standard errors itself.

Only loglikelihood-based tasks (``loglikelihood``, ``multiple_choice``) are scored this way; a
task that generates text or needs rolling perplexity is refused before any work with one line.

The offline suite (:data:`OFFLINE_TASKS`, data in ``prune_cli/tasksuite/``, built by
``bench/make_task_suite.py`` from held-out text) needs no network; lm-eval's own tasks need the
hub for their datasets unless they are in the local datasets cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

from prune_cli.core.errors import BadInputError, RecipeError
from prune_cli.core.registry import did_you_mean
from prune_cli.recipe.tasks import TaskSettings, parse_tasks  # noqa: F401 - parse_tasks re-exported
from prune_cli.stages.evaluate import EvalStage
from prune_cli.streaming.driver import BlockDriver

log = logging.getLogger(__name__)

SUITE_FOLDER = Path(__file__).resolve().parents[1] / "tasksuite"  # prune_cli/tasksuite
SUPPORTED_OUTPUTS = ("loglikelihood", "multiple_choice")
# lm-eval's bootstrap (standard errors of e.g. perplexity) forks a process pool by default, which
# hangs in a process that has started torch's threads: its single-process path instead.
_QUIET_ENV = {"DISABLE_MULTIPROC": "1", "TQDM_DISABLE": "1"}
BOOTSTRAP_ITERS = 1000

# name -> (data file, YAML body after the data path); metrics as lm-eval names them
OFFLINE_TASKS: dict[str, tuple[str, str]] = {
    "prune_lastword": ("lastword.jsonl", """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""),
    "prune_cloze": ("cloze.jsonl", """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""),
}


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401, PLC0415 - optional dependency (the eval extra)
    except ImportError:
        raise BadInputError("scoring tasks needs lm-eval-harness, which is not installed",
                            hint="pip install 'prune-cli[eval]' (lm-eval==0.4.13)") from None


def write_offline_suite(folder: Path) -> Path:
    """The offline tasks' YAML in ``folder`` (data paths absolute, so lm-eval finds them from
    any working directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, body) in OFFLINE_TASKS.items():
        path = (SUITE_FOLDER / data).as_posix()
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: \"{path}\"\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n", encoding="utf-8")
    return folder


@dataclass
class _Request:
    context: str
    continuation: str


class _LMBase:
    """What lm-eval reads from its model besides the three request methods."""

    def _init(self, tokenizer) -> None:
        from lm_eval.api.model import CacheHook  # noqa: PLC0415 - optional dependency (the eval extra)

        self._rank, self._world_size = 0, 1
        self.cache_hook = CacheHook(None)
        self.tokenizer = tokenizer

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def loglikelihood_rolling(self, requests):
        raise BadInputError("a task that needs rolling perplexity is not scored by prune-cli",
                            hint="prune-cli's own perplexity (--eval-text) measures that")

    def generate_until(self, requests):
        raise BadInputError("a task that generates text is not scored by prune-cli (its block walk scores "
                            "likelihoods only)", hint=f"choose tasks with output_type {' or '.join(SUPPORTED_OUTPUTS)}")


def _make_lm(answer):
    """An ``lm_eval.api.model.LM`` whose ``loglikelihood`` is ``answer(list of (context, continuation))``."""
    from lm_eval.api.model import LM  # noqa: PLC0415 - optional dependency (the eval extra)

    class _Answering(_LMBase, LM):
        def __init__(self, tokenizer):
            LM.__init__(self)
            self._init(tokenizer)

        def loglikelihood(self, requests):
            return answer([tuple(r.args) for r in requests])

    return _Answering


@contextlib.contextmanager
def _no_git_lookup():
    """lm-eval records the git commit of the working folder in its results (``git describe``
    in a subprocess), which prune-cli never reads: outside a git folder git prints ``fatal: not
    a git repository`` on our stderr. The lookup is replaced by None for the call."""
    import lm_eval.evaluator as evaluator  # noqa: PLC0415 - optional dependency (the eval extra)

    real = getattr(evaluator, "get_git_commit_hash", None)
    if real is None:  # another lm-eval layout: nothing to replace
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = real


class TaskSuite:
    """The requests of ``settings.tasks`` and, once answered, their lm-eval results (see the
    module docstring)."""

    def __init__(self, settings: TaskSettings, tokenizer):
        _require_lm_eval()
        if not settings.tasks:
            raise RecipeError("no task named", hint="e.g. --tasks prune_cloze,prune_lastword")
        self.settings = settings
        self.tokenizer = tokenizer
        self._folder = Path(tempfile.mkdtemp(prefix="prune-cli-tasks-"))
        write_offline_suite(self._folder)
        self._requests: list[tuple[str, str]] | None = None
        self._task_manager = None

    def close(self) -> None:

        shutil.rmtree(self._folder, ignore_errors=True)

    def _manager(self):
        """lm-eval's task index (built once: with lm-eval's own tasks it scans thousands of YAML files)."""
        if self._task_manager is None:
            self._task_manager = self._new_manager()
        return self._task_manager

    def _new_manager(self):
        from lm_eval.tasks import TaskManager  # noqa: PLC0415 - optional dependency (the eval extra)

        include = [str(self._folder), *(str(p) for p in self.settings.include_path)]
        offline_only = all(t in OFFLINE_TASKS for t in self.settings.tasks)
        manager = TaskManager(include_path=include, include_defaults=not offline_only)
        unknown = [t for t in self.settings.tasks if t not in manager.all_tasks]
        if unknown:

            raise BadInputError(f"unknown task {unknown[0]!r}",
                                hint=did_you_mean(unknown[0], sorted(OFFLINE_TASKS)) + "; offline tasks: "
                                + ", ".join(OFFLINE_TASKS) + " (lm-eval's own tasks by name, --include-path for YAML folders)")
        return manager

    def _evaluate(self, lm) -> dict:

        import lm_eval  # noqa: PLC0415 - optional dependency (the eval extra)

        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            import datasets  # noqa: PLC0415 - optional dependency (the data extra)

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover - lm-eval depends on datasets
            pass

        saved = {k: os.environ.get(k) for k in _QUIET_ENV}
        os.environ.update(_QUIET_ENV)
        try:
            with contextlib.redirect_stdout(io.StringIO()), _no_git_lookup():  # lm-eval prints; stdout is the report's
                return lm_eval.simple_evaluate(
                    model=lm, tasks=list(self.settings.tasks), num_fewshot=self.settings.num_fewshot,
                    limit=self.settings.limit, task_manager=self._manager(), log_samples=False,
                    bootstrap_iters=BOOTSTRAP_ITERS, verbosity="ERROR",
                )
        except (BadInputError, RecipeError):
            raise
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise BadInputError(f"cannot load the tasks' data: {exc}",
                                hint="lm-eval's own tasks download their datasets from the hub; offline, "
                                "use the offline tasks or local YAML (--include-path)") from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def requests(self) -> list[tuple[str, str]]:
        """Every distinct ``(context, continuation)`` pair the tasks ask about, in a fixed order."""
        if self._requests is None:
            seen: dict[tuple[str, str], None] = {}

            def record(pairs):
                for pair in pairs:
                    seen.setdefault(pair, None)
                return [(0.0, False)] * len(pairs)

            self._evaluate(_make_lm(record)(self.tokenizer))
            self._requests = list(seen)
        return self._requests

    def results(self, answers: dict[tuple[str, str], tuple[float, bool]]) -> dict:
        """Per task: lm-eval's metrics and standard errors (its names, without the ``,none``
        filter suffix) and the number of examples, from ``answers`` for :meth:`requests`."""
        out = self._evaluate(_make_lm(lambda pairs: [answers[p] for p in pairs])(self.tokenizer))
        tasks = {}
        for task, metrics in out["results"].items():
            values = {}
            for key, value in metrics.items():
                if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                values[metric if filt in ("", "none") else key] = None if value == "N/A" else float(value)
            tasks[task] = {"metrics": values, "samples": int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
                           or None, "version": out.get("versions", {}).get(task)}
        return tasks


@dataclass
class EncodedRequests:
    """Token sequences of the requests, grouped by length: ``batches[k]`` is ``(b, L_k)`` ids
    (right-padded), ``rows[k]`` the request index of each row, ``spans[i]`` the positions
    ``[start, end)`` of request ``i``'s continuation in its row."""

    batches: list[torch.Tensor] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)


def encode_requests(tokenizer, pairs: list[tuple[str, str]], max_length: int, bos: int | None,
                    batch_size: int) -> EncodedRequests:
    """Tokenise ``pairs`` as lm-eval's HF model does (see the module docstring)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prefix = [bos] if bos is not None else []
    sequences = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        head = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        cont = whole[len(head):]
        if not cont:
            raise BadInputError(f"a task asks for an empty continuation after {context[-40:]!r}")
        ids = prefix + head + cont
        if not prefix and not head:  # an empty context: condition on the EOS token, as lm-eval does
            ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad] + cont
        ids = ids[-max_length:]  # the last tokens, as lm-eval truncates from the left
        start = max(len(ids) - len(cont), 1)  # the first token is never scored
        sequences.append((ids, start))
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
    encoded = EncodedRequests(spans=[(0, 0)] * len(pairs))
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        width = max(len(sequences[i][0]) for i in chunk)
        batch = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids, start = sequences[i]
            batch[row, : len(ids)] = torch.tensor(ids)
            encoded.spans[i] = (start, len(ids))
        encoded.batches.append(batch)
        encoded.rows.append(chunk)
    return encoded


class TaskStage(EvalStage):
    """A walk stage: the continuations' log-likelihoods of :class:`EncodedRequests` (right padding
    is never attended to: attention is causal and only the real positions are read).
    :attr:`answers` after the walk: ``(log p, greedy)`` per request, in request order."""

    timing_key = "tasks"
    WHAT = "activations of the task requests"

    def __init__(self, encoded: EncodedRequests, head_dtype: torch.dtype | None = None, tally=None):
        super().__init__(torch.zeros(0, 0, dtype=torch.long), 1, tally=tally, head_dtype=head_dtype)
        self.encoded = encoded
        self.answers: list[tuple[float, bool]] = []

    def begin(self, driver: BlockDriver) -> None:
        self.driver = driver
        self.batches = []
        with driver.rounded_head(self.head_dtype):
            for ids in self.encoded.batches:
                self.batches += driver.capture(ids, ids.shape[0])

    @torch.no_grad()
    def finish(self, driver: BlockDriver) -> None:
        answers: list[tuple[float, bool] | None] = [None] * len(self.encoded.spans)
        with driver.rounded_head(self.head_dtype), driver.head_on_device():
            for batch, ids, rows in zip(self.batches, self.encoded.batches, self.encoded.rows, strict=False):
                for r, index in enumerate(rows):
                    start, end = self.encoded.spans[index]
                    row = ids[r : r + 1].to(driver.device)
                    logits = driver.head_logits(batch.hidden[r : r + 1], row)[0, start - 1 : end - 1].float()
                    targets = row[0, start:end]
                    logprobs = F.log_softmax(logits, dim=-1)
                    answers[index] = (float(logprobs.gather(1, targets[:, None]).sum()),
                                      bool((logits.argmax(-1) == targets).all()))
        self.batches = []  # HiddenStage.finish (not EvalStage's perplexity)
        self.answers = answers  # type: ignore[assignment]

    def extra_state(self) -> dict:
        return {"answers": self.answers}

    def load_extra_state(self, state: dict) -> None:
        self.answers = [tuple(a) for a in state["answers"]]


MAX_LENGTH = 4096  # tokens per request at most (the model's context, if shorter)


def max_length(config) -> int:
    """Tokens per request: the model's context (``max_position_embeddings``), at most :data:`MAX_LENGTH`."""
    return min(int(getattr(config, "max_position_embeddings", None) or 2048), MAX_LENGTH)


class TaskRun:
    """The tasks of one ``compress`` or ``eval`` run: the requests (collected and tokenised when
    it is made, so a bad task fails before any walk), one :class:`TaskStage` per model scored
    (``dense``, ``compressed``), and :meth:`report`."""

    def __init__(self, settings: TaskSettings, tokenizer, model_config, bos: int | None):
        self.suite = TaskSuite(settings, tokenizer)
        try:
            pairs = self.suite.requests()
            self.encoded = encode_requests(tokenizer, pairs, max_length(model_config), bos, settings.batch_size)
        except BaseException:
            self.suite.close()
            raise
        self.tokens = sum(int(b.numel()) for b in self.encoded.batches)
        log.info("tasks %s: %d requests, %d tokens", ",".join(settings.tasks), len(pairs), self.tokens)
        self.stages: dict[str, TaskStage] = {}

    def fingerprint(self) -> dict:
        """The settings and the exact token ids of the requests (what the scores depend on)."""

        digest = hashlib.sha256()
        for batch in self.encoded.batches:
            digest.update(batch.numpy().tobytes())
        digest.update(repr(self.encoded.spans).encode())

        return {**self.suite.settings.to_dict(), "requests": digest.hexdigest()[:16], "lm_eval": version("lm_eval")}

    def stage(self, which: str, head_dtype: torch.dtype | None = None, tally=None) -> TaskStage:
        """A stage scoring the model the walk it rides along sees, reported as ``which``."""
        self.stages[which] = TaskStage(self.encoded, head_dtype=head_dtype, tally=tally)
        return self.stages[which]

    def dense_stage(self) -> TaskStage:
        return self.stage("dense")

    def compressed_stage(self, head_dtype: torch.dtype | None = None, tally=None) -> TaskStage:
        return self.stage("compressed", head_dtype, tally)

    def results(self, which: str) -> dict:
        """lm-eval's results for the answers the finished stage ``which`` computed."""
        return self.suite.results(dict(zip(self.suite.requests(), self.stages[which].answers, strict=False)))

    def report(self) -> dict:
        """The report's ``tasks`` part: settings, request and token counts, per scored model its
        results, and with both the change of every metric (``compressed - dense``)."""
        try:
            out = {**self.suite.settings.to_dict(), "requests": len(self.suite.requests()), "tokens": self.tokens}
            for which in self.stages:
                out[which] = self.results(which)
        finally:
            self.suite.close()
        if out.get("dense") and out.get("compressed"):
            out["change"] = {
                task: {m: (v - out["dense"][task]["metrics"][m]) if v is not None and out["dense"][task]["metrics"].get(m) is not None else None
                       for m, v in scores["metrics"].items() if not m.endswith("_stderr")}
                for task, scores in out["compressed"].items()
            }
        else:
            out["change"] = None
        return out
