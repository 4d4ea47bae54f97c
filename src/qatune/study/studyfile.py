"""A study file (TOML) -> the runs it declares.

A study file has shared ``[defaults]`` (any training option), a list of ``[[arms]]`` (a model x fine-tuning method
(``strategy``) pair with its own options) and a ``[grid]`` whose lists multiply the runs: ``lora_rank``,
``alpha_policy`` (on the arms whose method has them: :mod:`qatune.methods`), ``train_questions`` (data volumes) and ``seed`` (all arms), or any other option; a
``[grid.ARM]`` table adds or replaces axes for one arm (as ``--set ARM.key=[...]`` does).
Each run is named by a hash of its resolved configuration, so re-running the study skips finished runs,
resumes an interrupted one from its checkpoint, and a changed setting is a new run rather than a stale one.
"""

from __future__ import annotations

import difflib
import itertools
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qatune.config import TrainConfig, config_hash
from qatune.errors import QatuneError, unreadable
from qatune.methods import METHODS as FINE_TUNING
from qatune.methods import OPTIONS as METHOD_OPTIONS
from qatune.study.sizes import optimizer_steps
from qatune.study.tuning import METHODS, rungs, tuning_seed

# What [tune.ARM] may try: training hyperparameters (a fine-tuning method's own options on its arms only), never
# what the candidates are judged on or what a run is.
TUNABLE = ("learning_rate", "warmup_ratio", "weight_decay", "batch_size", "grad_accum", "attention_dropout",
           *METHOD_OPTIONS)
# Options the study sets for every run itself: where its files go, resuming, the shared tokenisation cache.
STUDY_SETS = {"output_dir": "each run's directory is runs/<run id> in the study directory; choose that with --dir",
              "resume": "a study always resumes its runs from their checkpoints",
              "feature_cache_dir": "the study shares one tokenisation cache, cache/ in the study directory",
              "pause_at": "a study pauses its tuning candidates at their rungs itself ([tune] sets the rungs)",
              "oracle_threshold": "a study tunes a SQuAD v2 null threshold on validation data, never on the test "
                                  "questions (give validation_share or validation_data)"}


class StudyError(QatuneError, ValueError):
    """A study file or option that cannot be used; the message says where and what to do."""


@dataclass
class Run:
    id: str
    arm: str
    config: TrainConfig
    point: dict  # the grid values that made this run (for tables and figures)


@dataclass
class Group:
    """One configuration of a tuned arm (a grid point, seeds aside): its candidates (values of the tuned options)
    train at a seed of their own (``tuning_seed``, none of the final seeds) and are compared on validation F1; the
    chosen values then train afresh with every seed (the final runs; no candidate is one of them)."""

    id: str  # the configuration without its tuned options, at its tuning seed
    arm: str
    point: dict  # the grid point without the seed
    candidates: list[tuple[dict, Run]]  # (tuned values, its run at the tuning seed), in the order tried
    seeds: list[int]  # the final runs' seeds
    schedule: list[int]  # the rung steps, the last the full run
    settings: dict  # everything else a run of this configuration has
    directory: Path
    tuning_seed: int = 0  # the candidates' seed: the smallest non-negative whole number not in ``seeds``

    def run(self, values: dict, seed: int) -> Run:
        """The run of these tuned values at ``seed`` (a candidate at the tuning seed, else a final run)."""
        return _make_run(self.arm, {**self.settings, **values, "seed": seed}, {**self.point, **values, "seed": seed},
                         self.directory)


@dataclass
class Study:
    name: str
    path: Path
    directory: Path
    runs: list[Run]
    headline: tuple[str, str] | None  # the two arms compared by the paired bootstrap
    groups: list[Group] = field(default_factory=list)  # tuned configurations ([tune.ARM]); candidates are in runs
    method: str = "halving"
    eta: int = 3

    @property
    def final_runs(self) -> int:
        """Runs that end scored on the test data: every untuned run, and each tuned configuration's chosen values
        at every seed (its candidates never are: they train at the tuning seed and are only validated)."""
        return len(self.runs) - sum(len(g.candidates) for g in self.groups) + sum(len(g.seeds) for g in self.groups)

    def size(self) -> str:
        """How many runs, said the way a user counts them (candidates are tried, finals are scored)."""
        if not self.groups:
            return f"{len(self.runs)} runs"
        candidates = sum(len(g.candidates) for g in self.groups)
        return (f"{len(self.runs)} runs ({candidates} tuning candidates in {len(self.groups)} configurations); "
                f"{self.final_runs} final runs scored on the test data")


def load_study(path: str | Path, overrides: list[str] = (), directory: str | Path | None = None) -> Study:
    """Read a study file, apply command-line overrides (``--set``) and expand its grid into runs."""
    path = Path(path)
    spec = _read(path)
    meta, defaults, arms, grid, own = _tables(path, spec)
    name = meta.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise StudyError(f"{path}: [study] name = {name!r} must be a non-empty string without '/'")
    arm_names = [a["name"] for a in arms]
    headline = _headline(path, meta.get("headline"), arm_names)
    arm_grids = {a["name"]: {**grid, **own.get(a["name"], {})} for a in arms}  # [grid.ARM]: one arm's own axes
    tune = spec.get("tune", {})
    for override in overrides:
        _apply(override, defaults, arms, arm_grids, tune if isinstance(tune, dict) else {})
    _check_keys(path, defaults, arms, arm_grids)
    method, eta, tuned = _tune(path, tune, arms, arm_grids)
    base_dir = Path(directory) if directory else Path(meta.get("directory", f"studies-out/{name}"))
    if not base_dir.is_absolute() and directory is None:
        base_dir = Path.cwd() / base_dir
    runs, seen, groups = [], {}, []
    for arm in arms:
        if arm["name"] in tuned:
            groups += _tuned_groups(path, arm, defaults, arm_grids[arm["name"]], tuned[arm["name"]], base_dir,
                                    method, eta)
            expanded = [run for g in groups if g.arm == arm["name"] for _, run in g.candidates]
        else:
            expanded = _expand(path, arm, defaults, arm_grids[arm["name"]], base_dir)
        for run in expanded:
            if run.id not in seen:
                seen[run.id] = run
                runs.append(run)
            elif seen[run.id].arm != run.arm:
                _shared(path, seen[run.id], run, "")
    for g in groups:  # a tuned configuration's final runs, whichever values it chooses, are its arm's alone
        for values, _ in g.candidates:
            for seed in g.seeds:
                final = g.run(values, seed)
                if final.id in seen and seen[final.id].arm != g.arm:
                    _shared(path, seen[final.id], final, f" if its tuning chooses {values}")
    return Study(name, path, base_dir, runs, headline, groups, method, eta)


def _shared(path: Path, first: Run, second: Run, when: str) -> None:
    """Two arms that would train one run: a run belongs to one arm, so the other would silently have none."""
    point = ", ".join(f"{k}={v}" for k, v in second.point.items()) or "its one configuration"
    raise StudyError(f"{path}: arms {first.arm!r} and {second.arm!r} would train the same run ({point}; run id "
                     f"{second.id}){when}: a run belongs to one arm, so {second.arm!r} would have no result there. "
                     f"Make the arms differ (an option, or their seeds), or drop one of them")


def _tune(path: Path, table, arms: list[dict], arm_grids: dict[str, dict]) -> tuple[str, int, dict[str, dict]]:
    """The [tune] table: its method and eta, and per arm the options to try (checked)."""
    if not isinstance(table, dict):
        raise StudyError(f"{path}: tune must be a [tune] table")
    own = {k: v for k, v in table.items() if k in ("method", "eta") and not isinstance(v, dict)}  # else an arm's
    method, eta = own.get("method", "halving"), own.get("eta", 3)
    if method not in METHODS:
        raise StudyError(f"{path}: [tune] method = {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(eta, int) or isinstance(eta, bool) or eta < 2:
        raise StudyError(f"{path}: [tune] eta = {eta!r} must be a whole number >= 2 (1/eta of the candidates go on)")
    tuned = {}
    for arm_name, options in table.items():
        if arm_name in own:
            continue
        if not isinstance(options, dict):
            raise StudyError(f"{path}: [tune] {arm_name} = {options!r}: [tune] itself takes method and eta; the "
                             f"options to tune go in a table per arm, e.g. [tune.{next(iter(arm_grids))}] "
                             f"learning_rate = [1e-4, 3e-4]")
        if arm_name not in arm_grids:
            raise StudyError(f"{path}: [tune.{arm_name}]: no arm named {arm_name!r} (arms: {list(arm_grids)})")
        if not isinstance(options, dict) or not options:
            raise StudyError(f"{path}: [tune.{arm_name}] must be a table of options, each with its values to try")
        arm = next(a for a in arms if a["name"] == arm_name)
        for key, values in options.items():
            if key not in {f.name for f in fields(TrainConfig)}:
                near = difflib.get_close_matches(key, TUNABLE, n=1)
                raise StudyError(f"{path}: [tune.{arm_name}] {key}: unknown option"
                                 + (f" (did you mean {near[0]}?)" if near else f"; options that can be tuned: "
                                                                                 f"{', '.join(TUNABLE)}"))
            if key not in TUNABLE or _foreign(arm, key):
                why = (_foreign(arm, key) if key in TUNABLE else
                       "not a training hyperparameter (data, validation, evaluation, model and run options are the "
                       "study's to fix, so that every candidate is judged on the same questions)")
                raise StudyError(f"{path}: [tune.{arm_name}] {key}: cannot be tuned: {why}; options that can: "
                                 f"{', '.join(TUNABLE)}")
            if key in arm_grids[arm_name]:
                raise StudyError(f"{path}: [tune.{arm_name}] {key} is also a [grid] axis; an option is either "
                                 f"varied for comparison or tuned, not both")
            if not isinstance(values, list) or not values or any(v in values[:k] for k, v in enumerate(values)):
                raise StudyError(f"{path}: [tune.{arm_name}] {key} must be a list of distinct values to try")
        tuned[arm_name] = options
    return method, eta, tuned


def _tuned_groups(path: Path, arm: dict, defaults: dict, grid: dict, options: dict, base_dir: Path, method: str,
                  eta: int) -> list[Group]:
    """The configurations of a tuned arm, each with its candidates at the tuning seed. Unless the file (or --set)
    gives ``eval_subset``, their learning curves, and so the rungs, score all the validation questions."""
    seeds = grid.get("seed") or [arm.get("seed", defaults.get("seed", TrainConfig.seed))]
    axes = {k: v for k, v in grid.items() if k != "seed"}
    if not any("eval_subset" in table for table in (defaults, arm, grid)):
        arm = {**arm, "eval_subset": None}
    seed = tuning_seed(seeds)
    groups = []
    for run in _expand(path, arm, defaults, {**axes, "seed": [seed]}, base_dir):
        settings = {k: v for k, v in asdict(run.config).items() if k not in STUDY_SETS and k != "seed"}
        cfg = run.config
        if not cfg.has_validation or not cfg.eval_steps:
            raise StudyError(f"{path}: [tune.{arm['name']}] needs validation data (validation_share or "
                             f"validation_data) and eval_steps: candidates are compared on validation F1 at steps "
                             f"that are multiples of eval_steps")
        point = {k: v for k, v in run.point.items() if k != "seed"}
        combos = [dict(zip(options, vs)) for vs in itertools.product(*options.values())]
        group = Group("", arm["name"], point, [], list(seeds), [], settings, base_dir, seed)
        try:
            group.candidates = [(values, group.run(values, seed)) for values in combos]
        except (TypeError, ValueError) as e:
            raise StudyError(f"{path}: [tune.{arm['name']}] at {point or 'its one configuration'}: {e}") from e
        # in epochs, the rungs sit at shares of the estimated steps; the last rung is the run's end either way
        group.schedule = rungs(len(combos), optimizer_steps(cfg), cfg.eval_steps, method, eta)
        # the configuration without its tuned options, at its tuning seed, under its rungs and eta: another schedule
        # is another tuning, played again from the pauses at its own rungs (choices made under earlier rules are
        # not taken for this one's)
        group.id = config_hash({**{k: v for k, v in settings.items() if k not in options}, "seed": seed,
                                "tuning": {"rungs": group.schedule, "eta": eta}})
        groups.append(group)
    return groups


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StudyError(f"{path}: study file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(str(unreadable(path, "study file", e, "give a UTF-8 TOML file"))) from e
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML: {e}") from e


def _tables(path: Path, spec: dict) -> tuple[dict, dict, list[dict], dict, dict]:
    """The [study], [defaults], [[arms]] and [grid] tables, and the [grid.ARM] tables by arm, checked for shape."""
    for table in ("study", "defaults", "grid"):
        if not isinstance(spec.get(table, {}), dict):
            raise StudyError(f"{path}: {table} must be a [{table}] table, got {spec[table]!r}")
    arms = spec.get("arms")
    if not arms:
        raise StudyError(f"{path}: needs at least one [[arms]] table (name, model, strategy)")
    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise StudyError(f"{path}: arms must be [[arms]] tables (name, model, strategy)")
    for arm in arms:
        if "name" not in arm or "model" not in arm or "strategy" not in arm:
            raise StudyError(f"{path}: every [[arms]] needs name, model and strategy (got {sorted(arm)})")
    names = [a["name"] for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StudyError(f"{path}: arm name(s) {twice} used more than once; give every [[arms]] its own name")
    grid = dict(spec.get("grid", {}))
    own = {k: grid.pop(k) for k in [k for k, v in grid.items() if isinstance(v, dict)]}  # [grid.ARM] tables
    for arm_name, table in own.items():
        if arm_name not in names:
            raise StudyError(f"{path}: [grid.{arm_name}]: no arm named {arm_name!r} (arms: {names})")
        arm = next(a for a in arms if a["name"] == arm_name)
        foreign = [_foreign(arm, k) for k in table if _foreign(arm, k)]
        if foreign:
            raise StudyError(f"{path}: [grid.{arm_name}] {foreign[0]}")
    for where, table in [("grid", grid), *((f"grid.{n}", t) for n, t in own.items())]:
        for key, values in table.items():
            if not isinstance(values, list) or not values:
                raise StudyError(f"{path}: [{where}] {key} must be a non-empty list")
            twice = [v for k, v in enumerate(values) if v in values[:k]]
            if twice:
                raise StudyError(f"{path}: [{where}] {key} lists {twice[0]!r} more than once; give each value once")
    return spec.get("study", {}), dict(spec.get("defaults", {})), [dict(a) for a in arms], grid, own


def _headline(path: Path, headline, arm_names: list[str]) -> tuple[str, str] | None:
    if headline is None:
        return (arm_names[0], arm_names[1]) if len(arm_names) >= 2 else None
    if (not isinstance(headline, list) or len(headline) != 2
            or any(h not in arm_names for h in headline) or headline[0] == headline[1]):
        raise StudyError(f"{path}: [study] headline = {headline!r} must name two different arms (arms: {arm_names})")
    return headline[0], headline[1]


def parse_override(text: str) -> tuple[str | None, str, object]:
    """``key=value`` (all arms) or ``arm.key=value``; the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise StudyError(f"--set {text!r}: expected key=value or arm.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    arm, _, key = key.strip().rpartition(".")
    return arm or None, key, value


def _apply(text: str, defaults: dict, arms: list[dict], arm_grids: dict[str, dict], tune: dict) -> None:
    """One ``--set``: a grid key replaces that axis (of every arm, or of the one named), a tuned key the values
    that arm tries; any other key sets the option (a plain override wins over the arms' own settings too)."""
    arm_name, key, value = parse_override(text)
    known = {f.name for f in fields(TrainConfig)}
    if key not in known:
        near = difflib.get_close_matches(key, known, n=1)
        raise StudyError(f"--set {text!r}: unknown option {key!r}" + (f" (did you mean {near[0]}?)" if near else
                                                                      "; options are the `qatune train` flags with "
                                                                      "underscores"))
    if key in STUDY_SETS:
        raise StudyError(f"--set {text!r}: {key} is not an option of a study run: {STUDY_SETS[key]}")
    if arm_name is not None and arm_name not in arm_grids:
        raise StudyError(f"--set {arm_name}.{key}: no arm named {arm_name!r} (arms: {list(arm_grids)})")
    targets = [a for a in arms if arm_name in (None, a["name"])]
    if arm_name is not None and _foreign(targets[0], key):
        raise StudyError(f"--set {text!r}: {_foreign(targets[0], key)}")
    for arm in targets:
        grid = arm_grids[arm["name"]]
        tried = tune.get(arm["name"])
        if isinstance(tried, dict) and key in tried:
            values = value if isinstance(value, list) else [value]
            if not values or any(v in values[:k] for k, v in enumerate(values)):
                raise StudyError(f"--set {text!r}: {arm['name']} tunes {key}; give the distinct values it tries")
            tried[key] = values
        elif key in grid:
            values = value if isinstance(value, list) else [value]
            if not values:
                raise StudyError(f"--set {text!r}: a grid axis needs at least one value")
            grid[key] = values
        elif arm_name is None:
            defaults[key] = value
            arm.pop(key, None)
        else:
            arm[key] = value


def _check_keys(path: Path, defaults: dict, arms: list[dict], arm_grids: dict[str, dict]) -> None:
    known = {f.name for f in fields(TrainConfig)} - set(STUDY_SETS)
    tables = [("defaults", defaults), *((f"arm {a['name']!r}", a) for a in arms),
              *((f"grid of arm {n!r}", g) for n, g in arm_grids.items())]
    for where, table in tables:
        own = sorted(set(table) & set(STUDY_SETS))
        if own:
            raise StudyError(f"{path}: [{where}] sets {own[0]}: {STUDY_SETS[own[0]]}")
        bad = sorted(set(table) - known - {"name"})
        if bad:
            raise StudyError(f"{path}: [{where}] has unknown option(s) {bad}; options are the `qatune train` flags "
                             f"with underscores, e.g. {sorted(known)[:6]}...")


def _foreign(arm: dict, key: str) -> str:
    """Why ``key`` does not apply to ``arm`` (an option of other fine-tuning methods than the arm's), else ''."""
    if key not in METHOD_OPTIONS or key in _own_options(arm):
        return ""
    owners = [m.name for m in FINE_TUNING.values() if key in m.options]
    return f"{key} is an option of {', '.join(owners)}; arm {arm['name']!r} fine-tunes with {arm.get('strategy')}"


def _own_options(arm: dict) -> tuple[str, ...]:
    m = FINE_TUNING.get(arm.get("strategy"))
    return m.options if m else ()


def _expand(path: Path, arm: dict, defaults: dict, grid: dict, base_dir: Path) -> list[Run]:
    """One run per grid point of an arm (axes of other fine-tuning methods' options skipped)."""
    keys = [k for k in grid if not _foreign(arm, k)]
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        settings = {**defaults, **{k: v for k, v in arm.items() if k != "name"}, **point}
        settings = {k: v for k, v in settings.items() if not _foreign(arm, k)}
        try:
            runs.append(_make_run(arm["name"], settings, point, base_dir))
        except (TypeError, ValueError) as e:
            raise StudyError(f"{path}: arm {arm['name']!r} at {point}: {e}") from e
    return runs


def _make_run(arm: str, settings: dict, point: dict, base_dir: Path) -> Run:
    """A run of the study: its configuration, named by its hash, in runs/<id>, resuming, sharing the cache."""
    cfg = TrainConfig.from_dict(settings)
    rid = config_hash(cfg)
    cfg.output_dir = str(base_dir / "runs" / rid)
    cfg.feature_cache_dir = str(base_dir / "cache")
    cfg.resume = True
    cfg.oracle_threshold = False  # SQuAD v2 test data without validation data is refused when the data loads
    return Run(rid, arm, cfg, point)
