import subprocess
import sys


def test_import_is_light_and_fit_resolves_to_the_function():
    code = (
        "import sys, sotjax; assert 'jax' not in sys.modules, 'import sotjax pulled in jax';"
        "import sotjax.pipeline, sotjax.learn;"
        "assert callable(sotjax.fit) and sotjax.fit.__name__ == 'fit', sotjax.fit;"
        "assert sotjax.SOTResult.__name__ == 'SOTResult'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "sotjax.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("weigh", "embed", "demo", "eval"):
        assert name in proc.stdout
