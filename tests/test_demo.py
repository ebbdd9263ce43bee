"""The demo runs end to end on a small configuration and its checks pass."""
from jaxkv import demo


def test_demo_small_configuration(capsys, tmp_path):
    png = tmp_path / "occ.png"
    assert demo.main(["--requests", "6", "--decode", "12", "--quiet", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "block_stride 1,039,680 B" in out and "block_stride 1,473,408 B" in out
    assert "23,749.84 B per full token" in out
    assert "MISMATCH" not in out and "FAILED" not in out and "all passed" in out
    assert "[ok] attention with retracts == without" in out
    assert "[ok] retract path exercised" in out
    assert png.stat().st_size > 1000
