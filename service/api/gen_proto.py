"""Generate the gRPC stubs (with .pyi) from proto/kiln/v1/*.proto into service/api/grpc_gen/ (git-ignored).

Run: ``python -m service.api.gen_proto`` (``make proto``). Generated imports are rewritten to the
package path so the stubs import as ``service.api.grpc_gen.kiln.v1``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
OUT = Path(__file__).with_name("grpc_gen")


def generate(out: Path = OUT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.glob("kiln/v1/*.proto"))
    if not protos:
        raise SystemExit("no proto/kiln/v1/*.proto")
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for d in (out, out / "kiln", out / "kiln" / "v1"):
        (d / "__init__.py").touch()
    generated = sorted((out / "kiln" / "v1").glob("*_pb2*.py*"))
    for path in generated:
        text = re.sub(r"^from kiln\.v1 import", "from service.api.grpc_gen.kiln.v1 import", path.read_text(), flags=re.M)
        path.write_text(text)
    return generated


def main() -> int:
    for path in generate():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
