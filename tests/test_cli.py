from workbench.cli import main


def test_simulate_prints_a_summary(capsys):
    assert main(["simulate", "--requests", "200", "--qps", "4", "--policy", "least_requests"]) == 0
    out = capsys.readouterr().out
    assert "completed 200 requests" in out and "ttft" in out and "instance-3" in out


def test_simulate_writes_records(tmp_path, capsys):
    path = tmp_path / "out" / "records.csv"
    assert main(["simulate", "--requests", "50", "--policy", "block", "--csv", str(path)]) == 0
    assert path.read_text().count("\n") == 51


def test_bad_input_is_a_clear_error(capsys):
    assert main(["simulate", "--policy", "nope", "--requests", "5"]) == 2
    assert "valid policies" in capsys.readouterr().err
    assert main(["simulate", "--gpu", "Z100", "--requests", "5"]) == 2
    assert "known: " in capsys.readouterr().err
    assert main(["simulate", "--policy", "block@9", "--requests", "5"]) == 2
    assert "larger than the cluster" in capsys.readouterr().err


def test_compare_and_capacity_in_ci_size(tmp_path, capsys):
    out = tmp_path / "compare.csv"
    assert main(["compare", "--preset", "demo", "--requests", "150", "--qps", "6,10", "--seeds", "0,1",
                 "--policies", "least_requests,block", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "least_requests" in text and "block" in text and out.read_text().count("\n") == 1 + 2 * 2 * 2
    assert main(["capacity", "--preset", "demo", "--requests", "150", "--slo", "3", "--seeds", "0",
                 "--policies", "round_robin,block", "--lo", "4", "--hi", "40"]) == 0
    table = capsys.readouterr().out
    assert "capacity_qps" in table and "honest" in table
