import sys

try:
    from .cli import main
except ImportError as e:  # 'medal' is a folder in the current folder, not this package
    if getattr(sys.modules.get("medal"), "__file__", "") is not None:
        raise
    print(f"medal: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None

raise SystemExit(main())
