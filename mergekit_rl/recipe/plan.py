"""Plan one recipe stage: every output tensor, what it reads, and its resolved parameters.

A `Stage` (checks.py) plus its opened input checkpoints becomes a `StagePlan`: one engine
`TensorJob` per output tensor with the method's parameters evaluated for that tensor. Planning
reads headers only, so `--dry-run` can print it and the engine can stream it.

Layers and depth:
- A tensor is a layer tensor when its name holds `layers.N.` (also `h.N.`, `blocks.N.`).
- A `models:` recipe is one slice over every layer. A `slices:` recipe stacks its slices: the
  k-th layer of a slice is read at `start + k` of each source and written at `offset + k`
  (layers are renumbered), and `num_hidden_layers` (and `layer_types`) of the output config
  are rewritten.
- Depth t of layer k in a slice of L layers is k / (L - 1) (1 for a one-layer slice). Gradients
  are evaluated at t.
- Tensors outside the layers: embeddings (`embed`, `wte`, `wpe` in the name) are merged from
  the first slice's sources, every other one (final norm, lm_head) from the last slice's. Both
  take a gradient's first value (t = 0), as in mergekit; with the recipe key
  `outer_depth: ends` the final norm and lm_head take its last value (t = 1) instead.
- Filters (`{filter: ..., value: ...}`) match substrings of the output tensor name.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..engine import TensorJob
from ..errors import MismatchError, RecipeError, UsageError
from ..io.reader import Checkpoint, check_compatible, vocab_tensor_names
from ..merge import vocab
from ..merge.registry import MergeMethod
from .checks import SliceSpec, Source, Stage, same_ref
from .params import resolve

# prefix ends with the container name and a dot; group 2 is the layer index
_LAYER = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks)\.)(\d+)(\..+)$")
_PRE = ("embed", "wte", "wpe")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PEAK_CONSTANT_BYTES = 400 * 2**20  # python + torch + the reader's buffers, measured roughly


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: the engine job plus what the method needs besides the tensors."""

    job: TensorJob  # sources: base first (when has_base), then one per model
    has_base: bool
    model_ids: tuple[str, ...]  # one per non-base source: seeds random masks
    model_params: tuple[dict[str, Any], ...]  # as resolved from the recipe (defaults left out)
    global_params: dict[str, Any]
    t: float  # depth used for gradients


@dataclass
class TokenizerPlan:
    """The output tokenizer when it is not a plain copy (union vocabulary or chat_template)."""

    tokenizer: Any  # transformers tokenizer, saved with the output
    source: str  # 'union' or the reference it was copied from
    chat_template: str | None  # the recipe's value (a name, 'auto' or Jinja); None: unchanged
    size: int | None = None  # union vocabulary size (rows of the vocabulary tensors)
    vocab_names: frozenset[str] = frozenset()  # output tensors remapped to the union
    permutations: dict[str, Any] = field(default_factory=dict)  # ref -> int64 [size] (or -1)
    base_ref: str | None = None  # whose rows win for tokens several models have


@dataclass
class StagePlan:
    stage: Stage
    inputs: list[Checkpoint]  # job source indices point here
    refs: list[str]  # the recipe reference of each input
    tensors: list[TensorPlan]
    aux_from: Checkpoint | None  # config and tokenizer source
    config_updates: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerPlan | None = None

    @property
    def method(self) -> MergeMethod:
        return self.stage.method

    def jobs(self) -> list[TensorJob]:
        return [p.job for p in self.tensors]

    def peak_memory_bytes(self) -> int:
        """(inputs + 2) x the largest tensor in float32, plus a constant (the engine holds a
        tensor's inputs, the result and one temporary at a time); (2 x inputs + 4) for the
        vocabulary tensors of a union (their remapped copies, the default rows, a sum)."""
        remapped = self.tokenizer.vocab_names if self.tokenizer else frozenset()

        def copies(p: TensorPlan) -> int:  # a union's rows: the remapped copies and 2 more
            n = len(p.job.sources)
            return 2 * n + 4 if p.job.name in remapped else n + 2

        worst = max((copies(p) * math.prod(p.job.shape) for p in self.tensors), default=0)
        return 4 * worst + PEAK_CONSTANT_BYTES


# ---- names -------------------------------------------------------------------------------------


def split_layer(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.up.weight' -> ('model.layers.', 3, '.mlp.up.weight'); None outside."""
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def layer_names(ckpt: Checkpoint) -> dict[int, list[tuple[str, str]]]:
    """layer index -> (prefix, suffix) of each of its tensors, in storage order."""
    out: dict[int, list[tuple[str, str]]] = {}
    for name in ckpt.names():
        parts = split_layer(name)
        if parts:
            out.setdefault(parts[1], []).append((parts[0], parts[2]))
    return out


def num_layers(ckpt: Checkpoint) -> int:
    layers = layer_names(ckpt)
    return max(layers) + 1 if layers else 0


def outer_names(ckpt: Checkpoint, want_lm_head: bool) -> tuple[list[str], list[str]]:
    """Tensors outside the layers: (embeddings, the rest) in storage order. A tied lm_head is
    added to the rest when another input stores it (`want_lm_head`)."""
    pre: list[str] = []
    post: list[str] = []
    for name in ckpt.names():
        if split_layer(name) is None:
            (pre if any(k in name for k in _PRE) else post).append(name)
    tied = ckpt.tied_output_name
    if want_lm_head and tied is not None and tied not in post:
        post.append(tied)
    return pre, post


# ---- planning ----------------------------------------------------------------------------------


class _Builder:
    """Accumulates tensor plans and problems for one stage."""

    def __init__(
        self, stage: Stage, ckpts: dict[str, Checkpoint], union: tuple[int, frozenset[str]] | None
    ):
        self.union = union  # (union vocabulary size, vocabulary tensor names) or None
        self.stage = stage
        self.method = stage.method
        self.ckpts = ckpts  # recipe reference -> opened checkpoint
        self.inputs: list[Checkpoint] = []
        self.refs: list[str] = []
        self.tensors: list[TensorPlan] = []
        self.problems: list[tuple[str, str]] = []
        self.missing: set[str] = set()  # YAML paths already reported for a missing tensor
        self.bad_values: dict[str, list[str]] = {}  # message -> tensors whose values fail

    def index(self, ref: str) -> int:
        if ref not in self.refs:
            self.refs.append(ref)
            self.inputs.append(self.ckpts[ref])
        return self.refs.index(ref)

    def add(
        self, out_name: str, spec: SliceSpec, reads: Sequence[tuple[Source, str]], t: float
    ) -> None:
        """One output tensor from (source, input tensor name) pairs, base first if any."""
        shape = self._check_shapes(out_name, reads)
        if shape is None:
            return
        first = self.ckpts[reads[0][0].ref].info(reads[0][1])
        sources = tuple((self.index(src.ref), name) for src, name in reads)
        models = [src for src, _ in reads[1:]] if spec.base else [src for src, _ in reads]
        model_names = sorted(self.method.model_param_names())
        global_names = sorted(self.method.global_param_names())
        mps = tuple(
            resolve(model_names, [src.params, spec.params, self.stage.global_params], out_name, t)
            for src in models
        )
        gp = resolve(global_names, [spec.params, self.stage.global_params], out_name, t)
        self._check_values(out_name, mps, gp)
        plan = TensorPlan(
            job=TensorJob(out_name, sources, shape, first.dtype),
            has_base=spec.base is not None,
            model_ids=_model_ids([src.ref for src in models]),
            model_params=mps,
            global_params=gp,
            t=t,
        )
        self.tensors.append(plan)

    def _check_shapes(
        self, out_name: str, reads: Sequence[tuple[Source, str]]
    ) -> tuple[int, ...] | None:
        shapes = {}
        for src, name in reads:
            ckpt = self.ckpts[src.ref]
            if not ckpt.has(name):
                if src.path not in self.missing:  # one line per source, not one per tensor
                    self.missing.add(src.path)
                    self.problems.append((src.path, f"'{src.ref}' has no tensor '{name}'"))
                return None
            shapes[f"{src.ref}:{name}"] = ckpt.info(name).shape
        if self.union is not None and out_name in self.union[1]:  # rows: one per union token
            shapes = {k: (self.union[0], *v[1:]) for k, v in shapes.items()}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{r}: {list(s)}" for r, s in shapes.items())
            vocab = (
                " (vocabulary sizes differ; `tokenizer_source: union` merges them)"
                if any(k in out_name for k in ("embed", "lm_head"))
                else ""
            )
            self.problems.append(("", f"tensor '{out_name}' has different shapes{vocab}: {listed}"))
            return None
        return next(iter(shapes.values()))

    def _check_values(self, out_name: str, mps: Sequence[dict], gp: dict) -> None:
        """Cross-field checks need the values of one tensor (e.g. della's epsilon vs density)."""
        checks = [(self.method.global_params, gp)] + [(self.method.model_params, p) for p in mps]
        for model, values in checks:
            try:
                model.model_validate(values)
            except ValidationError as e:
                err = e.errors()[0]
                msg = str(err.get("ctx", {}).get("error", err["msg"]))
                self.bad_values.setdefault(msg, []).append(out_name)
                return

    def all_problems(self) -> list[tuple[str, str]]:
        """The problems, with a bad value reported once with the tensors it hits."""
        out = list(self.problems)
        for msg, names in self.bad_values.items():
            more = f" (and {len(names) - 1} more tensors)" if len(names) > 1 else ""
            out.append(("parameters", f"tensor '{names[0]}'{more}: {msg}"))
        return out


def _model_ids(refs: Sequence[str]) -> tuple[str, ...]:
    """The reference of each model; a model listed twice gets '#2', '#3' (distinct masks)."""
    out: list[str] = []
    for ref in refs:
        n = sum(1 for r in refs[: len(out)] if r == ref)
        out.append(ref if n == 0 else f"{ref}#{n + 1}")
    return tuple(out)


def _reads(spec: SliceSpec, names: str | dict[str, str]) -> list[tuple[Source, str]]:
    """(source, tensor name) for the base (if any) and each model; names: one name for all,
    or source YAML path -> name (a model may appear twice in a slice with other layers)."""
    srcs = ([spec.base] if spec.base else []) + list(spec.sources)
    return [(s, names if isinstance(names, str) else names[s.path]) for s in srcs]


def _full_range(spec: SliceSpec, ckpts: dict[str, Checkpoint]) -> dict[str, tuple[int, int]]:
    srcs = ([spec.base] if spec.base else []) + list(spec.sources)
    return {s.path: s.layer_range or (0, num_layers(ckpts[s.ref])) for s in srcs}


def plan_stage(stage: Stage, ckpts: dict[str, Checkpoint], source: str = "recipe") -> StagePlan:
    """Every output tensor of a stage; raises RecipeError (with every problem) or
    MismatchError when the inputs do not fit together."""
    tok = _tokenizer_plan(stage, ckpts, source)
    union = (tok.size, tok.vocab_names) if tok is not None and tok.size is not None else None
    b = _Builder(stage, ckpts, union)
    if not stage.sliced:
        try:
            check_compatible(
                [ckpts[r] for r in stage.merged_refs()], vocab_rows=union[1] if union else ()
            )
        except MismatchError as e:
            if "vocabulary sizes differ" not in str(e):
                raise
            hint = " In a recipe, `tokenizer_source: union` merges different vocabularies."
            raise MismatchError(str(e) + hint) from e
    ranges = [_full_range(spec, ckpts) for spec in stage.slices]
    first, last = stage.slices[0], stage.slices[-1]
    all_refs = [
        s.ref
        for spec in stage.slices
        for s in ([spec.base] if spec.base else []) + list(spec.sources)
    ]
    any_untied = any(not ckpts[r].tied_embeddings for r in all_refs)
    template = ckpts[first.sources[0].ref]
    pre, post = outer_names(template, any_untied and template.tied_embeddings)
    for name in pre:
        b.add(name, first, _reads(first, name), 0.0)
    offset = 0
    for spec, rng in zip(stage.slices, ranges, strict=True):
        offset += _plan_slice_layers(b, spec, rng, offset)
    tmpl_last = ckpts[last.sources[0].ref]
    _, post_last = outer_names(tmpl_last, any_untied and tmpl_last.tied_embeddings)
    top = 1.0 if stage.recipe.outer_depth == "ends" else 0.0  # mergekit: the first value
    for name in post_last:
        b.add(name, last, _reads(last, name), top)
    problems = b.all_problems()
    if problems:
        raise RecipeError(
            source, [(stage.label + p if p else stage.label.rstrip(), m) for p, m in problems]
        )
    aux = _aux_source(stage, ckpts)
    updates = _config_updates(aux, stage, ranges, offset) if stage.sliced else {}
    if union is not None:
        updates["vocab_size"] = union[0]
    return StagePlan(stage, b.inputs, b.refs, b.tensors, aux, updates, tok)


def _tokenizer_plan(
    stage: Stage, ckpts: dict[str, Checkpoint], source: str
) -> TokenizerPlan | None:
    """The union tokenizer and permutations, and/or the chat template, as the recipe asks."""
    recipe = stage.recipe
    union = recipe.token_source == "union"
    template = recipe.chat_template
    if not union and template is None:
        return None
    refs = stage.refs()
    base_ref = next((r for r in refs if same_ref(r, recipe.base_model or "")), refs[0])
    order = [base_ref] + [r for r in refs if r != base_ref]
    aux = _aux_source(stage, ckpts)
    key = "chat_template" if not union else "tokenizer_source"
    try:
        wanted = order if union or template == "auto" else []
        toks = {r: tokenizer_of(ckpts[r]) for r in wanted}
        if union:
            sizes = [_vocab_rows(ckpts[r]) for r in order]
            out, perms = vocab.build_union([toks[r] for r in order], sizes)
        else:
            out = tokenizer_of(aux) if aux is not None else None
    except UsageError as e:
        raise RecipeError(source, [(stage.label + key, str(e))]) from e
    if out is None:
        return None
    if template is not None:
        picked = vocab.pick_chat_template(template, list(toks.values()))
        if picked is not None:
            out.chat_template = picked
    if not union:
        return TokenizerPlan(out, aux.source.ref if aux else "", template)
    missing = vocab.absent_tokens(perms)
    if missing:
        warnings.warn(
            f"{stage.label or 'recipe'}: {missing} tokens of the union vocabulary are in no "
            "model's embedding (ids past its vocab_size); their rows are zeros.",
            stacklevel=2,
        )
    # the embedding comes from the first slice's sources, lm_head from the last slice's
    names = set(vocab_tensor_names(ckpts[stage.slices[0].sources[0].ref]))
    names |= set(vocab_tensor_names(ckpts[stage.slices[-1].sources[0].ref]))
    size = vocab.padded_size(int(perms[0].numel()), recipe.pad_to_multiple_of)
    by_ref = dict(zip(order, perms, strict=True))
    return TokenizerPlan(out, "union", template, size, frozenset(names), by_ref, base_ref)


def tokenizer_of(ckpt: Checkpoint) -> Any:
    """A checkpoint's tokenizer: the planned one of a dry-run stage output, else its files."""
    planned = getattr(ckpt, "planned_tokenizer", None)
    return (
        planned if planned is not None else vocab.load_tokenizer(ckpt.source.root, ckpt.source.ref)
    )


def _vocab_rows(ckpt: Checkpoint) -> int:
    """The model's embedding rows: config vocab_size, else the input embedding's rows."""
    size = (ckpt.config or {}).get("vocab_size")
    if isinstance(size, int):
        return size
    names = vocab_tensor_names(ckpt)
    return ckpt.info(names[0]).shape[0] if names else 0


def _plan_slice_layers(
    b: _Builder, spec: SliceSpec, rng: dict[str, tuple[int, int]], offset: int
) -> int:
    """Add the layer tensors of one slice written from layer `offset` on; returns its length."""
    tmpl = spec.sources[0]
    start, end = rng[tmpl.path]
    layers = layer_names(b.ckpts[tmpl.ref])
    n = end - start
    for k in range(n):
        if start + k not in layers:
            have = num_layers(b.ckpts[tmpl.ref])
            b.problems.append(
                (tmpl.path, f"'{tmpl.ref}' has {have} layers; layer {start + k} does not exist")
            )
            return n
        t = k / (n - 1) if n > 1 else 1.0
        for prefix, suffix in layers[start + k]:
            names = {path: f"{prefix}{a + k}{suffix}" for path, (a, _) in rng.items()}
            b.add(f"{prefix}{offset + k}{suffix}", spec, _reads(spec, names), t)
    return n


def _aux_source(stage: Stage, ckpts: dict[str, Checkpoint]) -> Checkpoint | None:
    """Config and tokenizer come from tokenizer_source, else the base, else the first model
    (a union vocabulary starts from the base's tokenizer and config too)."""
    tok = stage.recipe.token_source
    want = stage.recipe.base_model if tok in (None, "base", "union") else tok
    for ref, ckpt in ckpts.items():
        if want is not None and same_ref(ref, want):
            return ckpt
    return ckpts[stage.slices[0].sources[0].ref]


def _config_updates(
    aux: Checkpoint | None, stage: Stage, ranges: list[dict[str, tuple[int, int]]], total: int
) -> dict[str, Any]:
    """num_hidden_layers (whichever key the config uses) and per-layer lists like layer_types."""
    config = (aux.config if aux else None) or {}
    updates: dict[str, Any] = {k: total for k in LAYER_COUNT_KEYS if k in config}
    if not updates:
        updates["num_hidden_layers"] = total
    old_n = next((config[k] for k in LAYER_COUNT_KEYS if k in config), None)
    for key, value in config.items():
        if isinstance(value, list) and old_n and len(value) == old_n and key.startswith("layer"):
            picked = []
            for spec, rng in zip(stage.slices, ranges, strict=True):
                a, e = rng[spec.sources[0].path]
                picked += value[a:e]
            updates[key] = picked
    return updates
