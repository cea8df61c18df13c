"""Length rules of ``encode(halt_threshold=E, length_rule=...)``: one target, four ways to reach it.

On small random models (both rollouts, halting on and off): the exact rule is the first length whose error meets
the target; the search rule finds the same length wherever the lengths meeting the target form one run (and,
when none does, the error does not fall again after two rises), with fewer pixel decodes; the verified rule decodes
the predicted length and steps up only while the target is missed; the predicted rule runs
exactly the iterations its predicted length needs, with no decoder and no pixel decode, and a predicted length k
gives exactly the tokens of ``encode(budget=k)``. Every rule decides each image
alone. The length predictor round-trips through ``save_pretrained`` / ``from_pretrained``.
"""

import json

import numpy as np
import pytest
import torch

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.fit_length_predictor import fit_head, measure_batch, with_predictor
from adaptive_tokenizer.length_report import verified_choices
from adaptive_tokenizer.length_rules import (VERIFIED_START_MARGIN, LengthSearch, VerifiedStep, choose_iterations,
                                             search_starts, verified_iterations)

from .test_rollout import Counter, small_model

BUDGET = 32  # 4 iterations of 8 tokens


def tokenizer(rollout: str, halting: bool, predictor: bool) -> AdaptiveTokenizer:
    model = small_model(rollout=rollout, dynamic_halting=halting, dynamic_halting_confidence=0.02)
    if predictor:  # fitted on measured errors of random images, so its predictions vary between images
        pixels = torch.rand(24, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        features, errors = measure_batch(model, pixels, halting_confidence=0.02 if halting else None)
        model = with_predictor(model, fit_head(model, features, errors, ("pixels", "class", "latents"), 8, steps=300))
    return AdaptiveTokenizer(model, batch_size=4)


@pytest.fixture(scope="module", params=[("cached", False), ("recurrent", False), ("cached", True)],
                ids=["cached", "recurrent", "cached-halting"])
def tok(request):
    return tokenizer(*request.param, predictor=True)


@pytest.fixture(scope="module")
def pixels():
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                                             size=64, mode="bilinear")
    return torch.cat([torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)), smooth]).clamp(0, 1)


def thresholds_of(tok, pixels):
    """Thresholds between the measured errors: each spreads the images over several lengths."""
    _, errors = tok.reconstructions(pixels, max_tokens=BUDGET)
    values = errors.flatten().sort().values
    return errors, [float((values[i] + values[i + 1]) / 2) for i in range(1, len(values) - 1, 3)]


def search_finds_it(row, threshold):
    """Sufficient for the search to find the exact rule's length: the lengths meeting the target form one unbroken
    run; or, when none does, the error does not fall from the lowest-error length on."""
    meets = (row <= threshold).tolist()
    if any(meets):
        first, last = meets.index(True), len(meets) - 1 - meets[::-1].index(True)
        return all(meets[first : last + 1])
    tail = row[int(row.argmin()) :]
    return bool((tail[1:] >= tail[:-1]).all())


def replay_search(row, start, threshold, bisect):
    """The search's bookkeeping on a known error row: (chosen iteration index, decodes)."""
    search = LengthSearch(start, len(row), threshold, bisect=bisect)
    while probes := search.next_probes():
        assert not set(probes) & set(search.errors)  # never decodes a length twice
        search.errors.update({probe: float(row[probe]) for probe in probes})
    return search.chosen(), len(search.errors)


def test_exact_rule_is_the_first_length_meeting_the_target(tok, pixels):
    errors, thresholds = thresholds_of(tok, pixels)
    for threshold in thresholds:
        result = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule="exact")
        expected = (choose_iterations(errors, [threshold])[0] + 1) * 8
        assert result.num_tokens.tolist() == expected.tolist()
        assert result.predicted_errors is None
        assert result.errors.tolist() == pytest.approx(errors[range(len(pixels)), expected // 8 - 1].tolist(),
                                                       abs=1e-6)


def test_search_rule_finds_the_exact_length(tok, pixels):
    errors, thresholds = thresholds_of(tok, pixels)
    checked = 0
    for threshold in thresholds:
        exact = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule="exact")
        search = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule="search")
        for index, row in enumerate(errors):
            chosen = int(search.num_tokens[index]) // 8 - 1
            assert search.errors[index] == pytest.approx(row[chosen].item(), abs=1e-6)  # measured, not predicted
            if (row <= threshold).any():  # some length meets the target: the search's length meets it too
                assert row[chosen] <= threshold + 1e-6 and chosen >= int(exact.num_tokens[index]) // 8 - 1
            if search_finds_it(row, threshold):
                checked += 1
                assert search.num_tokens[index] == exact.num_tokens[index]
                assert torch.equal(search.tokens[index], exact.tokens[index])
    assert checked >= len(pixels)


def test_search_encodes_an_image_no_further_than_its_answer():
    """Images that settle early leave the encoder's batch: with a target every image meets at its first length,
    the search encodes one iteration, decodes it and stops; with a target none meets, every image runs all of them
    (its answer is the lowest error, found from the longest length)."""
    tok = tokenizer("cached", False, predictor=True)
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    encoder = Counter(tok.model.encoder.transformer)
    easy = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=10.0, length_rule="search")
    settled_early = list(encoder.batch_sizes)
    encoder.batch_sizes.clear()
    tok.encode(pixels, max_tokens=BUDGET, halt_threshold=1e-6, length_rule="search")
    encoder.handle.remove()
    assert easy.num_tokens.tolist() == [8] * 4 and settled_early == [4]
    assert encoder.batch_sizes == [4] * 4


def test_search_starts_at_the_longest_length_when_no_estimate_meets_the_target():
    predicted = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.5, 0.45, 0.46, 0.47], [0.5, 0.4, 0.3, 0.05]])
    assert search_starts(predicted, 0.1, 3, 4) == [3, 3, 3]  # the first two: none meets 0.1, whatever the argmin
    assert search_starts(predicted, 0.35, 3, 4) == [2, 3, 2]
    assert search_starts(None, 0.1, 3, 4) == [1, 1, 1]  # no predictor: bisection from the middle


def test_search_on_a_table_reproduces_the_exact_rule_with_fewer_decodes():
    """The search's bookkeeping on known error curves: the exact rule's choice wherever ``search_finds_it``, fewer
    decodes than the exact rule's (which decodes every length up to its choice, all of them when none meets the
    target) when the start is close; a length meeting the target whenever one does."""
    generator = torch.Generator().manual_seed(0)
    falling = torch.rand(200, 8, generator=generator).sort(dim=1, descending=True).values
    bumpy = falling + 0.15 * torch.rand(200, 8, generator=generator)  # rises again here and there
    for curves in (falling, bumpy):
        for threshold in (0.2, 0.5, 0.8):
            exact = choose_iterations(curves, [threshold])[0]
            reached = (curves <= threshold).any(dim=1)
            every_length = torch.where(reached, exact + 1, torch.full_like(exact, 8))
            for bisect, starts in ((True, [3] * 200), (False, exact.tolist())):
                decodes = 0
                for row, start, expected in zip(curves, starts, exact.tolist()):
                    chosen, used = replay_search(row, start, threshold, bisect)
                    decodes += used
                    if search_finds_it(row, threshold):
                        assert chosen == expected
                    if bool((row <= threshold).any()):
                        assert row[chosen] <= threshold
                if curves is falling and not bisect:  # starting at the answer: itself and the next shorter one,
                    # or, when no length meets the target, the longest three
                    assert decodes <= int(torch.where(reached, 2, 3).sum()) + int((~reached).sum())
                    assert decodes < int(every_length.sum()) or int(every_length.sum()) <= len(curves) * 2
                elif curves is falling:  # bisection: at most 4 decodes for 8 lengths where a length meets it
                    assert decodes <= 4 * int(reached.sum()) + 8 * int((~reached).sum())


def test_search_finds_the_lowest_error_when_no_length_meets_the_target():
    """Walking down from the longest length, the search stops after two rises in a row, so it finds a lowest
    error that lies behind a single rise (a photo's curve measured on the default model), not one behind two."""
    brick = torch.tensor([0.0666, 0.0666, 0.0645, 0.0649, 0.0647, 0.0659, 0.0669, 0.068])
    assert replay_search(brick, 7, 0.06, bisect=False) == (2, 8)
    falling = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert replay_search(falling, 6, 0.1, bisect=False) == (7, 3)  # 6, 7, then 5: from 7 down it rose twice
    behind_two_rises = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert replay_search(behind_two_rises, 7, 0.05, bisect=False)[0] == 7  # documented limit: the exact rule says 0


def test_predicted_rule_runs_exactly_the_predicted_iterations_without_decoding(tok, pixels):
    predicted = tok.predict_errors(pixels)[:, : BUDGET // 8]
    threshold = float(predicted.median())
    expected = choose_iterations(predicted, [threshold])[0]
    counters = [Counter(m) for m in (tok.model.encoder.transformer, tok.model.decoder, tok.model.base.decoder)]
    result = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule="predicted")
    encoder, decoder, pixel_decoder = (c.batch_sizes for c in counters)
    for counter in counters:
        counter.handle.remove()
    assert result.num_tokens.tolist() == ((expected + 1) * 8).tolist()
    assert len(set(result.num_tokens.tolist())) > 1  # the images got different lengths
    assert result.errors is None  # nothing was measured ...
    assert result.predicted_errors.tolist() == pytest.approx(predicted[range(len(pixels)), expected].tolist(),
                                                             rel=1e-5)  # ... the estimate has its own field
    assert pixel_decoder == []
    if not tok.config.dynamic_halting:
        assert decoder == []
    # the encoder ran each image through its own number of iterations, no more
    iterations_per_batch = []
    for start in range(0, len(pixels), tok.batch_size):
        iterations_per_batch.append(int(expected[start : start + tok.batch_size].max()) + 1)
    assert len(encoder) == sum(iterations_per_batch)
    for index in range(len(pixels)):  # a predicted length k gives exactly the tokens of encode(budget=k)
        k = int(result.num_tokens[index])
        assert torch.equal(result.tokens[index], tok.encode(pixels[index], budget=k).tokens[0])


def replay_verified(row, start, threshold):
    """The verified rule's bookkeeping on a known error row: (chosen iteration index, decodes)."""
    step = VerifiedStep(start, len(row), threshold)
    while probes := step.next_probes():
        assert not set(probes) & set(step.errors)
        step.errors.update({probe: float(row[probe]) for probe in probes})
    return step.chosen(), len(step.errors)


def test_verified_rule_steps_up_from_the_predicted_length(tok, pixels):
    """The verified rule decodes the predicted length (estimate x (1 + VERIFIED_START_MARGIN) meeting the target)
    and steps up while the measured error is above it: its lengths are the replay on the measured errors, its errors
    measured, its estimates kept apart; a chosen length k gives exactly the tokens of ``encode(budget=k)``."""
    errors, thresholds = thresholds_of(tok, pixels)
    predicted = tok.predict_errors(pixels)[:, : BUDGET // 8]
    stepped_up = 0
    for threshold in thresholds:
        result = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule="verified")
        assert result.length_rule == "verified"
        starts = choose_iterations(predicted * (1 + VERIFIED_START_MARGIN), [threshold])[0]
        chosen, decodes = (t[0] for t in verified_choices(errors, predicted, [threshold]))
        assert result.num_tokens.tolist() == ((chosen + 1) * 8).tolist()
        assert result.errors.tolist() == pytest.approx(errors[range(len(pixels)), chosen].tolist(), abs=1e-6)
        assert result.predicted_errors.tolist() == pytest.approx(predicted[range(len(pixels)), chosen].tolist(),
                                                                 rel=1e-5)
        for index, row in enumerate(errors):
            start = int(starts[index])
            assert int(chosen[index]) >= start  # never below the start
            if (row[start:] <= threshold).any():  # a length from the start on meets it: the chosen one does
                assert row[chosen[index]] <= threshold + 1e-6
            stepped_up += int(chosen[index]) > start
    assert stepped_up > 0  # some image missed the target at its start
    for index in range(len(pixels)):
        k = int(result.num_tokens[index])
        assert torch.equal(result.tokens[index], tok.encode(pixels[index], budget=k).tokens[0])


def test_verified_rule_on_a_table_is_its_bookkeeping():
    """``verified_iterations`` (the table form that ``evaluate`` and ``bench`` replay) makes the per-image
    bookkeeping's choices and counts its decodes: one at the start, one more per step up, every length from the
    start on when none meets the target (the lowest error seen, first on ties)."""
    generator = torch.Generator().manual_seed(4)
    falling = torch.rand(100, 8, generator=generator).sort(dim=1, descending=True).values
    bumpy = falling + 0.15 * torch.rand(100, 8, generator=generator)
    ties = torch.tensor([[0.5, 0.4, 0.4, 0.45, 0.4, 0.6, 0.7, 0.4]])
    for curves in (falling, bumpy, ties):
        starts = torch.randint(0, 8, (3, len(curves)), generator=generator)
        thresholds = [0.2, 0.5, 0.8]
        chosen, decodes = verified_iterations(curves, starts, thresholds)
        for t, threshold in enumerate(thresholds):
            for row, start, c, d in zip(curves, starts[t].tolist(), chosen[t].tolist(), decodes[t].tolist()):
                assert (c, d) == replay_verified(row, start, threshold)
    assert replay_verified(ties[0], 1, 0.3) == (1, 7)  # none meets 0.3: the first lowest error seen (0.4 at 1)
    assert replay_verified(torch.tensor([0.9, 0.2, 0.1, 0.05]), 2, 0.3) == (2, 1)  # never walks down


def test_verified_rule_decodes_about_once_where_the_start_meets_the_target():
    """With a target every image meets at its start, the verified rule encodes to the start and decodes once per
    image: images leave the encoder's batch once their answer is known."""
    tok = tokenizer("cached", False, predictor=True)
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    from adaptive_tokenizer.length_rules import choose_length

    with torch.inference_mode():
        out = choose_length(tok.model, pixels, 4, 10.0, "verified")
    assert out.num_iterations.tolist() == [1] * 4 and out.decodes.tolist() == [1] * 4


def test_default_rule_is_verified_with_a_predictor_and_exact_without(pixels):
    """``halt_threshold`` without ``length_rule``: the verified rule on a model with a length predictor, the exact
    rule on one without (the fallback is said in ``result.length_rule``); a fixed budget has no rule."""
    with_predictor = tokenizer("cached", False, predictor=True)
    plain = tokenizer("cached", False, predictor=False)
    default = with_predictor.encode(pixels, max_tokens=BUDGET, halt_threshold=0.3)
    verified = with_predictor.encode(pixels, max_tokens=BUDGET, halt_threshold=0.3, length_rule="verified")
    assert default.length_rule == "verified" and default.num_tokens.tolist() == verified.num_tokens.tolist()
    fallback = plain.encode(pixels, max_tokens=BUDGET, halt_threshold=0.3)
    exact = plain.encode(pixels, max_tokens=BUDGET, halt_threshold=0.3, length_rule="exact")
    assert fallback.length_rule == "exact" and fallback.num_tokens.tolist() == exact.num_tokens.tolist()
    assert plain.encode(pixels, budget=16).length_rule is None


@pytest.mark.parametrize("rule", ["exact", "search", "verified", "predicted"])
def test_every_rule_decides_each_image_alone(tok, pixels, rule):
    _, thresholds = thresholds_of(tok, pixels)
    threshold = thresholds[len(thresholds) // 2]
    batch = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule=rule)
    reversed_batch = tok.encode(list(pixels.flip(0)), max_tokens=BUDGET, halt_threshold=threshold, length_rule=rule)
    again = tok.encode(pixels, max_tokens=BUDGET, halt_threshold=threshold, length_rule=rule)
    for index in range(len(pixels)):
        alone = tok.encode(pixels[index], max_tokens=BUDGET, halt_threshold=threshold, length_rule=rule)
        for other in (batch, again, reversed_batch):
            position = index if other is not reversed_batch else len(pixels) - 1 - index
            assert torch.equal(other.tokens[position], alone.tokens[0])
            assert other.num_tokens[position] == alone.num_tokens[0]


def test_predictor_round_trips_through_save_and_load(tok, pixels, tmp_path):
    tok.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["length_predictor"]["features"] == ["pixels", "class", "latents"]
    loaded = AdaptiveTokenizer.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.predict_errors(pixels), tok.predict_errors(pixels))
    threshold = float(tok.predict_errors(pixels).median())
    a = tok.encode(pixels, halt_threshold=threshold, length_rule="predicted")
    b = loaded.encode(pixels, halt_threshold=threshold, length_rule="predicted")
    assert a.num_tokens.tolist() == b.num_tokens.tolist()


def test_predictor_rules_need_a_predictor(pixels):
    plain = tokenizer("cached", False, predictor=False)
    for rule in ("predicted", "verified"):
        with pytest.raises(ValueError, match=f"length_rule='{rule}' needs a model with a length predictor.*"
                                             "fit-length-predictor"):
            plain.encode(pixels, halt_threshold=0.1, length_rule=rule)
    with pytest.raises(ValueError, match="fit-length-predictor"):
        plain.predict_errors(pixels)
    # the measured rules work without one (the search bisects)
    exact = plain.encode(pixels, halt_threshold=0.3, length_rule="exact")
    assert plain.encode(pixels, halt_threshold=0.3, length_rule="search").num_tokens.shape == exact.num_tokens.shape


@pytest.mark.parametrize("kwargs,message", [
    ({"length_rule": "exact"}, "give halt_threshold"),
    ({"halt_threshold": 0.1, "length_rule": "fastest"}, "length_rule must be one of"),
    ({"halt_threshold": -0.1}, "non-negative"),
    ({"halt_threshold": float("nan")}, "non-negative"),
    ({"halt_threshold": True}, "non-negative"),
    ({"halt_threshold": "0.1"}, "non-negative"),
])
def test_bad_length_arguments_are_rejected(tok, pixels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(pixels[0], **kwargs)


@pytest.mark.parametrize("value", [np.float32(0.3), np.float64(0.3), torch.tensor(0.3), 0.3])
def test_any_real_scalar_is_a_threshold(tok, pixels, value):
    reference = tok.encode(pixels, halt_threshold=float(np.float32(0.3)) if isinstance(value, np.float32)
                           else 0.3)
    if isinstance(value, torch.Tensor):
        reference = tok.encode(pixels, halt_threshold=float(value))
    assert tok.encode(pixels, halt_threshold=value).num_tokens.tolist() == reference.num_tokens.tolist()


def test_fit_length_predictor_command_writes_a_loadable_model(tmp_path, capsys):
    """``adaptive-tokenizer fit-length-predictor`` on a model without a predictor: measures the photos, selects a
    head on the held-out ones, writes the model with it and the report; the model then encodes with
    ``length_rule="predicted"``."""
    from PIL import Image

    from adaptive_tokenizer import cli
    from adaptive_tokenizer.fit_length_predictor import fit_length_predictor

    plain = tokenizer("cached", False, predictor=False)
    plain.save_pretrained(tmp_path / "plain")
    photos = tmp_path / "photos"
    photos.mkdir()
    generator = np.random.default_rng(0)
    for index in range(12):  # smooth to noisy images
        noise = generator.random((64, 64, 3)) * (index / 11)
        base = np.linspace(0, 1, 64)[None, :, None] * np.ones((64, 64, 3)) * (1 - index / 11)
        Image.fromarray(((noise + base) * 255).clip(0, 255).astype(np.uint8)).save(photos / f"p{index:02d}.png")
    paths = sorted(photos.iterdir())
    report = fit_length_predictor(plain, paths, tmp_path / "fitted", val_fraction=0.25, steps=30, log=lambda _: None,
                                  measurements=tmp_path / "cache.safetensors", folds=4)
    assert report["num_val_images"] == 3 and report["num_train_views"] == 18  # 9 images x (centre, mirror)
    folds = report["cross_validation"]
    assert folds["folds"] == 4 and folds["margin"] == report["selected"]["margin"]
    step = plain.config.tokens_per_iteration
    assert [row["mean_tokens"] for row in folds["targets"]] == [step * i for i in (2, 3, 4, 5, 6)]
    for row in folds["targets"]:
        assert row["gain_over_fixed"] == pytest.approx(row["share"] - row["fixed_share"])
        assert 0 <= row["same_length_as_exact"] <= row["within_one_of_exact"] <= 1
    selected = {key: report["selected"][key] for key in ("features", "hidden")}
    assert len(report["candidates"]) == 6 and selected in [
        {"features": c["features"], "hidden": c["hidden"]} for c in report["candidates"]]
    assert 0 <= report["selected"]["margin"] <= 0.3 and len(report["margins"]) == 31
    fitted = AdaptiveTokenizer.from_pretrained(tmp_path / "fitted")
    assert fitted.config.length_predictor.features == tuple(report["selected"]["features"])
    assert json.loads((tmp_path / "fitted" / "fit_report.json").read_text())["selected"] == report["selected"]
    result = fitted.encode(paths, halt_threshold=float(fitted.predict_errors(paths).median()), length_rule="predicted")
    assert result.predicted_errors is not None and result.errors is None
    # the command line, reusing the measurements cache
    code = cli.main(["fit-length-predictor", "--model", str(tmp_path / "plain"), str(photos), "-o",
                     str(tmp_path / "again"), "--val-fraction", "0.25", "--fit-steps", "30", "--measurements",
                     str(tmp_path / "cache.safetensors")])
    assert code == 0 and "fitted a length predictor" in capsys.readouterr().out
    assert AdaptiveTokenizer.from_pretrained(tmp_path / "again").config.length_predictor is not None
    code = cli.main(["fit-length-predictor", "--model", str(tmp_path / "plain"), str(photos), "-o",
                     str(tmp_path / "never"), "--cross-validate", "13"])
    assert code == 2 and "2 <= folds <= the number of images (12), got 13" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cross_validation_folds_split_the_images_by_name_hash():
    """Every image is in exactly one fold, fold 0 is what ``val_fraction = 1 / folds`` holds out, folds are
    filled in order of sha256 rank; a fold count outside 2..n is refused before anything is measured."""
    from adaptive_tokenizer.fit_length_predictor import held_out_images, image_folds

    names = [f"photo{i}.jpg" for i in range(23)]
    fold = image_folds(names, 5)
    assert fold.tolist().count(0) == 5 and sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    assert sorted(set(image_folds(names[:12], 5).tolist())) == [0, 1, 2, 3, 4]  # as many folds as asked for
    assert {i for i in range(23) if fold[i] == 0} == held_out_images(names, 1 / 5)
    assert image_folds(list(reversed(names)), 5).tolist() == list(reversed(fold.tolist()))  # by name, not order
    for bad in (0, 1, 24):
        with pytest.raises(ValueError, match="2 <= folds <= the number of images"):
            image_folds(names, bad)


@pytest.mark.parametrize("rule,stored", [("search", {"errors"}), ("verified", {"errors", "predicted_errors"}),
                                         ("predicted", {"predicted_errors"})])
def test_cli_encode_takes_the_length_rule(tmp_path, pixels, rule, stored):
    """``encode --length-rule``: the token file holds the library's lengths and the measured errors (exact, search)
    or the estimates (predicted), each under its own name."""
    from PIL import Image
    from safetensors.torch import load_file

    from adaptive_tokenizer import cli
    from adaptive_tokenizer.image_io import to_pil

    tok = tokenizer("cached", False, predictor=True)
    tok.save_pretrained(tmp_path / "model")
    paths = []
    for index, image in enumerate(pixels):
        paths.append(str(tmp_path / f"img{index}.png"))
        to_pil(image).save(paths[-1])
    threshold = float(tok.predict_errors(paths).median())
    out = tmp_path / "tokens.safetensors"
    assert cli.main(["encode", "--model", str(tmp_path / "model"), *paths, "-o", str(out), "--halt-threshold",
                     str(threshold), "--length-rule", rule]) == 0
    stored_tensors = load_file(out)
    expected = tok.encode(paths, halt_threshold=threshold, length_rule=rule)
    assert stored_tensors["num_tokens"].tolist() == expected.num_tokens.tolist()
    assert set(stored_tensors) == {"tokens", "num_tokens", *stored}


def test_broken_predictor_weights_are_a_clear_error(pixels):
    tok = tokenizer("cached", False, predictor=True)
    with torch.no_grad():
        tok.model.length_predictor.net[-1].bias.fill_(float("nan"))
    for rule in ("predicted", "search", "verified"):
        with pytest.raises(ValueError, match="non-finite"):
            tok.encode(pixels, halt_threshold=0.1, length_rule=rule)


def test_rules_report_counts_the_decodes_each_rule_needs():
    """``rules_report`` (evaluate's table): the exact rule decodes every length up to its choice, and all of them
    for an image no length brings to the target; the search replays its bookkeeping on the same errors."""
    from adaptive_tokenizer.length_report import rules_report

    errors = torch.tensor([[0.9, 0.5, 0.3, 0.2], [0.8, 0.7, 0.6, 0.55], [0.4, 0.3, 0.2, 0.1]])
    budgets = [8, 16, 24, 32]
    report = rules_report(errors, errors, None, np.array([3.0, 2.0, 1.0]), budgets, target_tokens=24)
    threshold = report["exact"]["threshold"]
    exact = choose_iterations(errors, [threshold])[0]
    reached = (errors <= threshold).any(dim=1)
    expected = torch.where(reached, exact + 1, torch.full_like(exact, 4)).double().mean()
    assert report["exact"]["decodes_per_image"] == pytest.approx(float(expected))
    assert not bool(reached.all())  # the second image never reaches it: its four decodes are counted
    assert report["search"]["same_length_as_exact"] == 1.0
