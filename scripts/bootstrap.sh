# shellcheck shell=bash
# Sourced (not executed) by spark-submit.sh and test.sh:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
#
# Makes sure Java >= 17 is available, creates/refreshes the project virtualenv
# ($ROOT/.venv, the package installed editable from setup.cfg), builds the zip of
# the sparkgd package that is shipped to executors, and exports:
#
#     ROOT                   the repository root
#     PYSPARK_PYTHON         $ROOT/.venv/bin/python (and PYSPARK_DRIVER_PYTHON)
#     SPARK_HOME             the pyspark package installed in the venv
#     PATH                   with $ROOT/.venv/bin first
#     SPARKGD_PYFILES        $ROOT/.venv/pyfiles/sparkgd-<content hash>.zip
#     SPARKGD_LOG4J          $ROOT/sparkgd/conf/log4j2.properties
#
# Safe under `set -euo pipefail` in the caller. On a fatal problem it prints one
# line starting with "sparkgd: error:" to stderr and exits (this is sourced, so it
# exits the caller): 2 for a missing/old Java, 1 for a failed venv setup.
#
# Environment knobs: SPARKGD_BASE_PYTHON (interpreter used to create the venv,
# default python3), JAVA_HOME (java to check and use).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export ROOT

# --- Java -------------------------------------------------------------------

_sparkgd_check_java() {
    local java_bin out ver major found
    if [[ -n "${JAVA_HOME:-}" ]]; then
        java_bin="$JAVA_HOME/bin/java"
    else
        java_bin="$(command -v java 2>/dev/null || true)"
    fi
    found=""
    if [[ -z "$java_bin" ]]; then
        found="no java on PATH"
    elif [[ ! -x "$java_bin" ]]; then
        found="no java at $java_bin"
    else
        out="$("$java_bin" -version 2>&1 || true)"
        # First quoted token, e.g.  openjdk version "17.0.15" 2025-04-15
        #                           java version "1.8.0_392"
        ver="$(printf '%s\n' "$out" | sed -n 's/^[^"]*version "\([^"]*\)".*/\1/p' | head -n 1 || true)"
        if [[ -z "$ver" ]]; then
            found="unrecognized output from $java_bin -version: $(printf '%s' "$out" | head -n 1 | cut -c1-80)"
        else
            if [[ "$ver" == 1.* ]]; then
                major="${ver#1.}"
                major="${major%%[!0-9]*}"
            else
                major="${ver%%[!0-9]*}"
            fi
            if [[ -z "$major" ]] || (( 10#$major < 17 )); then
                found="version $ver at $java_bin"
            fi
        fi
    fi
    if [[ -n "$found" ]]; then
        echo "sparkgd: error: Java 17 or newer is required to run Spark (found: $found); install it, e.g. 'apt-get install openjdk-17-jre-headless', or point JAVA_HOME at one" >&2
        exit 2
    fi
}
_sparkgd_check_java

# --- virtualenv ---------------------------------------------------------------

_SPARKGD_VENV="$ROOT/.venv"
_SPARKGD_VPY="$_SPARKGD_VENV/bin/python"
_SPARKGD_STAMP="$_SPARKGD_VENV/.sparkgd-stamp"
_SPARKGD_BASE_PY="${SPARKGD_BASE_PYTHON:-python3}"

_sparkgd_config_hash() {
    # sha256 of setup.cfg + pyproject.toml (whichever exist).
    "$_SPARKGD_BASE_PY" - "$ROOT" <<'PY'
import hashlib, os, sys
h = hashlib.sha256()
for name in ("setup.cfg", "pyproject.toml"):
    p = os.path.join(sys.argv[1], name)
    h.update(name.encode() + b"\0")
    if os.path.exists(p):
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(b"\0")
print(h.hexdigest())
PY
}

_sparkgd_setup_venv() {
    local want have="" log="$_SPARKGD_VENV/install.log"
    if ! command -v "$_SPARKGD_BASE_PY" >/dev/null 2>&1; then
        echo "sparkgd: error: $_SPARKGD_BASE_PY not found; Python 3.9 or newer is required" >&2
        exit 1
    fi
    want="$(_sparkgd_config_hash)"

    # A venv without a working interpreter (interrupted creation, Python upgraded
    # underneath it, ...) is removed and recreated.
    if [[ -e "$_SPARKGD_VENV" ]] && ! "$_SPARKGD_VPY" -c '' >/dev/null 2>&1; then
        rm -rf "$_SPARKGD_VENV"
    fi
    if [[ ! -e "$_SPARKGD_VENV" ]]; then
        echo "sparkgd: creating .venv (first run)..." >&2
        local out
        if ! out="$("$_SPARKGD_BASE_PY" -m venv "$_SPARKGD_VENV" 2>&1)"; then
            echo "sparkgd: error: '$_SPARKGD_BASE_PY -m venv $_SPARKGD_VENV' failed: $(printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | tail -n 1) (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            rm -rf "$_SPARKGD_VENV"
            exit 1
        fi
    else
        if [[ -f "$_SPARKGD_STAMP" ]]; then
            have="$(cat "$_SPARKGD_STAMP" 2>/dev/null || true)"
            if [[ "$have" == "$want" ]]; then
                return 0
            fi
            echo "sparkgd: setup.cfg changed, reinstalling into .venv..." >&2
        else
            echo "sparkgd: installing sparkgd into .venv..." >&2
        fi
    fi

    rm -f "$_SPARKGD_STAMP"
    if ! {
            echo "== $(date) pip install -e $ROOT[test,plot]"
            PIP_DISABLE_PIP_VERSION_CHECK=1 "$_SPARKGD_VPY" -m pip install -e "$ROOT[test,plot]"
        } >"$log" 2>&1; then
        echo "sparkgd: error: installing sparkgd into .venv failed; last lines of $log:" >&2
        tail -n 25 "$log" >&2 || true
        exit 1
    fi
    printf '%s\n' "$want" >"$_SPARKGD_STAMP"
}

# Serialize concurrent first runs (two scripts started at once) where possible.
if command -v flock >/dev/null 2>&1; then
    _SPARKGD_LOCK="${TMPDIR:-/tmp}/sparkgd-venv-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1).lock"
    exec 9>"$_SPARKGD_LOCK"
    flock 9
    _sparkgd_setup_venv
    flock -u 9
    exec 9>&-
else
    _sparkgd_setup_venv
fi

# --- environment ----------------------------------------------------------------

export PYSPARK_PYTHON="$_SPARKGD_VPY"
export PYSPARK_DRIVER_PYTHON="$_SPARKGD_VPY"
export PATH="$_SPARKGD_VENV/bin:$PATH"
export VIRTUAL_ENV="$_SPARKGD_VENV"

if ! SPARK_HOME="$("$_SPARKGD_VPY" -c 'import pyspark,os;print(os.path.dirname(pyspark.__file__))' 2>/dev/null)" \
        || [[ -z "$SPARK_HOME" ]]; then
    echo "sparkgd: error: pyspark is not importable from $_SPARKGD_VPY; delete $_SPARKGD_VENV and rerun" >&2
    exit 1
fi
export SPARK_HOME

# --- package zip shipped to executors (--py-files) ------------------------------

# Named by a hash of its content and never rewritten, so a job that is running
# (driver or executors) keeps reading the zip it started with while another run
# ships a newer tree. Zips unused for a day are pruned.
if ! SPARKGD_PYFILES="$("$_SPARKGD_VPY" - "$ROOT" "$_SPARKGD_VENV/pyfiles" <<'PY'
import hashlib, os, sys, time, zipfile
root, outdir = sys.argv[1], sys.argv[2]
pkg = os.path.join(root, "sparkgd")
entries = []
for d, dirs, files in os.walk(pkg):
    dirs[:] = sorted(x for x in dirs if x != "__pycache__" and not x.startswith("."))
    rel = os.path.relpath(d, root)
    in_conf = rel.split(os.sep)[:2] == ["sparkgd", "conf"]
    for f in sorted(files):
        if f.endswith(".py") or (in_conf and not f.startswith(".")):
            with open(os.path.join(d, f), "rb") as fh:
                entries.append((os.path.join(rel, f), fh.read()))
h = hashlib.sha256()
for name, data in entries:
    h.update(name.encode() + b"\0" + data + b"\0")
os.makedirs(outdir, exist_ok=True)
out = os.path.join(outdir, "sparkgd-%s.zip" % h.hexdigest()[:16])
if not os.path.exists(out):
    tmp = "%s.tmp-%d" % (out, os.getpid())
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    os.replace(tmp, out)
os.utime(out)
for old in os.listdir(outdir):
    p = os.path.join(outdir, old)
    if p != out and time.time() - os.path.getmtime(p) > 86400:
        try:
            os.remove(p)
        except OSError:
            pass
print(out)
PY
)"; then
    echo "sparkgd: error: could not build the package zip in $_SPARKGD_VENV/pyfiles" >&2
    exit 1
fi
export SPARKGD_PYFILES

export SPARKGD_LOG4J="$ROOT/sparkgd/conf/log4j2.properties"

unset -f _sparkgd_check_java _sparkgd_config_hash _sparkgd_setup_venv
unset _SPARKGD_VENV _SPARKGD_VPY _SPARKGD_STAMP _SPARKGD_BASE_PY _SPARKGD_LOCK
