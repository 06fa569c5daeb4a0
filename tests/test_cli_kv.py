from types import SimpleNamespace

import pytest

from crosslayer import CLAForCausalLM
from crosslayer.__main__ import main

from .conftest import last_json, run_cli, tiny_config


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process (a subprocess costs seconds of imports): returncode, stdout, stderr."""
    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_kv_json_reproduces_paper_bytes(cli):
    for preset, expected in [("1b-H128-MHA", 163840), ("1b-H128-MQA", 10240), ("1b-H128-MQA-CLA2", 5120),
                             ("1b-H128-MQA-CLA3", 3584), ("1b-H128-MQA-CLA4", 2560),
                             ("1b-H128-MQA-CLA2-KeepEnds", 5632), ("3b-H128-MQA", 16384)]:
        proc = cli("kv", preset, "--json")
        assert proc.returncode == 0, proc.stderr
        assert last_json(proc.stdout)["kv_bytes_per_token"] == expected


def test_kv_capacity_arithmetic_and_config_file(tmp_path, cli):
    config = tiny_config(cla_factor=2)
    config.save_pretrained(tmp_path / "model")
    proc = cli("kv", str(tmp_path / "model"), "--seq-len", "100", "--memory", "10MiB", "--json", "--kv-dtype",
                   "fp32", "--weight-dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    r = last_json(proc.stdout)
    per_token = 2 * 2 * 16 * 3 * 4  # K,V x kv heads x head_dim x 3 producers x fp32
    assert r["kv_bytes_per_token"] == per_token and r["kv_bytes_per_sequence"] == per_token * 100
    weights = sum(p.numel() for p in CLAForCausalLM(config).parameters()) * 4  # counted on the built model
    assert r["max_sequences"] == (10 * 2**20 - weights) // (per_token * 100)
    assert "sharing groups     [0-1] [2-3] [4-5]" in proc.stdout  # the plan, as groups of layers
    # what CLA would do to a dense model
    r2 = last_json(cli("kv", "1b-H128-MQA", "--cla-factor", "2", "--json").stdout)
    assert r2["kv_bytes_per_token"] == 5120


def test_kv_human_output_and_list(cli):
    proc = cli("kv", "--list-presets")
    assert proc.returncode == 0 and "1b-H128-MQA-CLA2-DenseBack" in proc.stdout and "tinyllama-1.1b-CLA2" in proc.stdout
    proc = cli("kv", "1b-H128-MQA-CLA2", "--memory", "80GiB", "--seq-len", "2048")
    assert "5,120" in proc.stdout and "sequences of 2,048 tokens" in proc.stdout


def test_cli_errors_exit_2_without_traceback(tmp_path, cli):
    (tmp_path / "bad.json").write_text('{"hidden_size": 64, "num_attention_heads": 3, "num_key_value_heads": 2}')
    for args in (["kv", "no-such-preset"], ["kv", str(tmp_path / "bad.json")], ["kv", "tiny-H32-MQA", "--memory", "lots"],
                 ["kv", str(tmp_path / "missing.json")], ["kv", "1b-H128-MQA", "--cla-factor", "0"], ["kv"]):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr, args


def test_console_entry_point_runs():
    proc = run_cli("kv", "1b-H128-MQA-CLA2", "--json")  # the installed console command, in a process of its own
    assert proc.returncode == 0 and last_json(proc.stdout)["kv_bytes_per_token"] == 5120
