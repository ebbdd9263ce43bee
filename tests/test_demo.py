"""The demo runs end to end on a small configuration and its checks pass."""
from jaxkv import demo


def test_demo_default_configuration(capsys, tmp_path):
    # The README's demo as a user runs it (the default CPU preset is sized to force retracts).
    png = tmp_path / "occ.png"
    assert demo.main(["--quiet", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "block_stride 1,039,680 B" in out and "block_stride 1,473,408 B" in out
    assert "23,749.84 B per full token" in out
    assert "MISMATCH" not in out and "FAILED" not in out and "all passed" in out
    assert "[ok] attention with retracts == without" in out
    assert "[ok] retract path exercised" in out
    assert "[ok] DCP attention over 2 devices == single device" in out
    assert png.stat().st_size > 1000
