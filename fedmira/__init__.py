"""fedmira: federated LoRA fine-tuning of radiology-report language models with Flower.

Everything imports under this one name: ``fedmira.common`` (the plain library),
``fedmira.server`` and ``fedmira.client`` (the two Flower apps, each with its deployment
side), ``fedmira.simulations`` (tools on one machine) and :mod:`fedmira.cli` (the ``fedmira``
command; also ``python -m fedmira``). README, Layout.

The four subpackages keep the design's top-level folders (``common/``, ``server/``, ...). An
installed wheel holds them inside ``fedmira/`` (setuptools ``package-dir`` in pyproject.toml), so
nothing called ``common`` or ``server`` lands in site-packages. Run from a source tree or from a
Flower app bundle (FAB: Flower unpacks the project's files as they are in the repository), they
are the folders next to this one, so the package's search path takes in its parent folder.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _source_tree_root() -> Path | None:
    """Return the repository (or unpacked FAB) this package sits in, or None when installed as a wheel."""
    if (_HERE / "common").is_dir():  # a wheel, or a source tree with its links: nothing to add
        return None
    root = _HERE.parent
    pyproject = root / "pyproject.toml"
    # Only fedmira's own tree: in site-packages the parent folder holds other distributions.
    if (root / "common" / "__init__.py").is_file() and pyproject.is_file() \
            and 'name = "fedmira"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


_ROOT = _source_tree_root()
if _ROOT is not None:
    __path__.append(str(_ROOT))  # noqa: F821 -- the package's own search path (PEP 420 style)
