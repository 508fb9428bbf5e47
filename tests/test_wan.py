def test_exact_safeguard_keeps_the_winner_term_from_rising_on_a_wan_transformer() -> None:
    """The first-order check of benchmarks/safeguard_exactness.py on video latents ``[16, 2, 4, 4]`` through the Wan
    family's call: after a small step along the parameter-space rule's gradient the winner term never rises beyond
    the second-order tolerance."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from safeguard_exactness import Setting, run

    report = run(
        Setting(batches=20, pairs=2, beta=100.0, drift_steps=5), progress=False, starts=("drifted",), model="wan"
    )
    rules = report["starts"]["drifted"]
    assert rules["parameter"]["batches"] == 20 and rules["parameter"]["rose_beyond_tolerance"] == 0
    assert 0.0 <= rules["parameter"]["lambda_min"] <= rules["parameter"]["lambda_max"] <= 1.0
