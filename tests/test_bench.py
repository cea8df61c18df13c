"""The benchmark runs end to end on a tiny model and reports what the README promises."""

import json

from adaptive_tokenizer.bench import reference_choice, run_benchmark
from adaptive_tokenizer.cli import main

from .test_rollout import small_model


def test_reference_choice_is_the_authors_rule():
    import torch

    errors = torch.tensor([0.5, 0.4, 0.45, 0.3])
    assert reference_choice(errors, 0.0) == 3  # never met: lowest error
    assert reference_choice(errors, 10.0) == 0  # met at once
    assert reference_choice(errors, 0.42) == 1  # first running minimum below the threshold
    assert reference_choice(torch.tensor([0.5, 0.4, 0.4]), 0.0) == 1  # ties: the first


def test_benchmark_reports_ratios_and_agreement():
    lines = []
    config = small_model(rollout="cached").config
    summary = run_benchmark(config, batch=3, threads=1, device="cpu", dtype="float32", repeats=1,
                            target_tokens=16, budgets=[8, 16, 32], per_image_check=True, print_fn=lines.append)
    assert json.loads(lines[-1]) == summary
    for key in ("fixed64_vs_reference", "adaptive_vs_reference", "cached_vs_recurrent"):
        assert key in summary
    assert summary["adaptive_agrees_with_reference_per_image"] is True
    assert summary["adaptive_vs_reference"] > 0 and summary["cached_vs_recurrent"] > 0
    assert any(line.startswith("reference") for line in lines)


def test_bench_cli_rejects_bad_budgets(capsys):
    assert main(["bench", "--budgets", "64,x"]) == 2
    assert "budgets" in capsys.readouterr().err
    for flag in ("--batch", "--limit"):
        assert main(["bench", "--rules", flag, "0"]) == 2
        assert f"{flag} must be a positive number of images, got 0" in capsys.readouterr().err


def test_bench_cli_takes_the_preset_and_dtype_names_of_the_library(capsys):
    """``--size``: a name of ``presets.list_presets()``; ``--dtype``: any name ``from_pretrained`` takes."""
    assert main(["bench", "--size", "alit_huge"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'alit_huge'" in err and all(name in err for name in ("alit_small", "default"))
    assert main(["bench", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'int8'" in err and all(name in err for name in ("float32", "bf16", "fp16"))


def test_rules_benchmark_times_every_rule_side_by_side():
    """``bench --rules``: the authors' algorithm, the exact, search, verified and predicted rules and a fixed budget
    in one run over every image, in batches, with the ratios of images/s, whether the search found the exact rule's
    lengths, and each rule's decodes per image, mean tokens and share meeting its target."""
    import torch

    from adaptive_tokenizer.bench import run_rules_benchmark

    from .test_length_rules import tokenizer

    tok = tokenizer("cached", False, predictor=True)
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    lines = []
    summary = run_rules_benchmark(tok, pixels, threads=1, target_tokens=16, batch=3, print_fn=lines.append)
    assert json.loads(lines[-1]) == summary
    assert (summary["images"], summary["batch"]) == (4, 3)
    for key in ("search_vs_exact", "predicted_vs_exact", "predicted_vs_reference", "predicted_vs_fixed",
                "verified_vs_exact", "verified_vs_search", "exact_vs_reference"):
        assert summary[key] > 0
    assert 0 <= summary["search_same_lengths_as_exact"] <= 1
    assert [line.split()[0] for line in lines[:-1]] == ["what", "reference", "exact", "search", "verified",
                                                         "predicted", "fixed"]
    rules = summary["rules"]
    assert rules["predicted"]["decodes_per_image"] == 0 and rules["fixed"]["decodes_per_image"] == 0
    assert rules["fixed"]["mean_tokens"] == 16 and rules["exact"]["decodes_per_image"] >= 1
    assert 1 <= rules["verified"]["decodes_per_image"] <= rules["exact"]["decodes_per_image"] + 4
    for row in rules.values():
        assert 0 <= row["share_meeting_target"] <= 1 and 0 <= row["fixed_share_meeting_target"] <= 1
    # the fixed row is judged at the exact rule's target: its share is the fixed share there
    assert rules["fixed"]["share_meeting_target"] == rules["exact"]["fixed_share_meeting_target"]
