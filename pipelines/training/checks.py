"""The train stage's checks from the spec alone: run before any stage starts, and by ``gradmimic validate``.

They build the model on the meta device (shapes, no memory), so a misspelt parameter, a reference that does not
fit or a mimic parameter that cannot be scored fails in a second, not after the pool is read.
"""

from __future__ import annotations

from pipelines.models.build import apply_trainable, fit_state, match_names, meta_model, shapes
from pipelines.run.config import SpecError, ref_name
from pipelines.training.config import MODES, TrainConfig, mimic_params, model_spec


def spec_error(where: str, exc: BaseException) -> SpecError:
    """``exc`` as a :class:`SpecError` naming the field ``where`` (a ``KeyError``'s message without its quotes)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return SpecError(f"{where}: {msg}")


def check_train(cfg: TrainConfig, spec) -> None:
    """Everything checkable from the spec alone (run before any stage starts, and by ``gradmimic validate``)."""
    try:
        model = meta_model(model_spec(cfg))
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise spec_error("model.arch" if not cfg.model.backbone else "model.backbone", exc) from None
    names = [n for n, _ in model.named_parameters()]
    for field_name in ("reinit", "trainable", "freeze"):
        for pattern in getattr(cfg, field_name) or ():
            if not match_names(names, [pattern]):
                raise SpecError(f"{field_name}: no parameter matches {pattern!r} (e.g. {', '.join(names[-3:])})")
    training = apply_trainable(model, cfg.trainable, cfg.freeze)
    if not training:
        raise SpecError("trainable: nothing left to train")
    if MODES[cfg.mode].scored:
        _check_params(cfg, model, training)
    for field_name in ("init", "reference"):
        source = getattr(cfg, field_name)
        other = ref_name(source)
        if other is None:
            continue
        theirs = spec.stage(other).config
        if theirs.task != cfg.task and not (theirs.task == "clip" and cfg.task == "classify"):
            raise SpecError(f"{field_name}: stage {other!r} trains a {theirs.task} model, this stage a {cfg.task} one")
        full = field_name == "init" or MODES[cfg.mode].full_reference
        wanted = list(shapes(model)) if full else list(mimic_params(cfg))
        skip = set(match_names(names, cfg.reinit)) if field_name == "init" else set()
        theirs_meta = meta_model(model_spec(theirs)).state_dict()  # parameters and buffers: shapes, no memory
        mine = {n: s for n, s in shapes(model).items() if n in wanted and n not in skip}
        try:
            fit_state(mine, theirs_meta)
        except ValueError as exc:
            raise SpecError(f"{field_name}: stage {other!r} ({theirs.model.arch}) does not fit this "
                            f"{cfg.model.arch} model: {exc}") from None
        if field_name == "reference":
            missing = [n for n in wanted if n not in theirs_meta]
            if missing:
                raise SpecError(f"{field_name}: stage {other!r} has no parameter {missing[0]!r}")


def _check_params(cfg: TrainConfig, model, training) -> None:
    import torch

    from gradmimic import find_parameters
    from gradmimic.open_clip_sites import projection_params

    params = mimic_params(cfg)
    try:
        find_parameters(model, params)
    except KeyError as exc:
        raise spec_error("mimic.params", exc) from None
    for name in params:
        if name not in training and cfg.mimic.reweight == "param":
            raise SpecError(f"mimic.params: {name!r} is frozen, so reweighting it changes nothing")
    if cfg.task == "clip":
        allowed = set(projection_params(model).values())
        bad = [n for n in params if n not in allowed]
        if bad:
            raise SpecError(f"mimic.params: CLIP scores its projections ({', '.join(sorted(allowed))}), not {bad[0]!r}")
    else:
        for name in params:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if not isinstance(owner, torch.nn.Linear) or not name.endswith(".weight"):
                raise SpecError(f"mimic.params: {name!r} is not the weight of an nn.Linear layer (e.g. head.weight)")
