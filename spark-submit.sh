#!/usr/bin/env bash
# Run a sparkgd job with Spark's own spark-submit, from the project virtualenv.
#
#     ./spark-submit.sh [spark-submit options] jobs/train.py [job options]
#
# On first use this creates .venv at the repository root (installing the package
# from setup.cfg). It then adds, ahead of your options (yours win where Spark keeps
# the last value):
#     --master local[*]                      unless you pass --master yourself
#     --py-files <sparkgd package zip>       merged with your --py-files
#     --driver-java-options / spark.executor.extraJavaOptions
#                                            the quiet log4j2 config (merged with yours)
#     --conf spark.ui.showConsoleProgress=false
#     --conf spark.pyspark.python / spark.pyspark.driver.python = .venv/bin/python
set -euo pipefail

usage() {
    echo "usage: ./spark-submit.sh [spark-submit options] jobs/train.py [job options]" >&2
}

if [[ $# -eq 0 ]]; then
    usage
    exit 2
fi

# --- split the arguments: spark-submit options | application file | job options --
# spark-submit's options without a value; every other "-x"/"--xxx" takes one
# (either as the next argument or as --xxx=value).
is_switch() {
    case "$1" in
        -h | --help | -v | --verbose | --version | --supervise | --usage-error) return 0 ;;
        *) return 1 ;;
    esac
}

spark_opts=()      # user's spark-submit options, minus the ones merged below
user_master=0
user_pyfiles=()
user_driver_jopts=()
user_exec_jopts=()
want_help=0
app=""
i=0
args=("$@")
n=$#
while (( i < n )); do
    a="${args[i]}"
    if [[ "$a" != -* ]]; then
        app="$a"
        i=$((i + 1))
        break
    fi
    if is_switch "$a"; then
        case "$a" in -h | --help | --version | --usage-error) want_help=1 ;; esac
        spark_opts+=("$a")
        i=$((i + 1))
        continue
    fi
    if [[ "$a" == --*=* ]]; then
        name="${a%%=*}"
        val="${a#*=}"
        i=$((i + 1))
    else
        name="$a"
        if (( i + 1 >= n )); then
            echo "sparkgd: error: spark-submit option $name needs a value" >&2
            usage
            exit 2
        fi
        val="${args[i + 1]}"
        i=$((i + 2))
    fi
    case "$name" in
        --master) user_master=1; spark_opts+=("$name" "$val") ;;
        --py-files) if [[ -n "$val" ]]; then user_pyfiles+=("$val"); fi ;;
        --driver-java-options) if [[ -n "$val" ]]; then user_driver_jopts+=("$val"); fi ;;
        --conf | -c)
            v="${val#*=}"
            case "$val" in
                spark.driver.extraJavaOptions=*) if [[ -n "$v" ]]; then user_driver_jopts+=("$v"); fi ;;
                spark.executor.extraJavaOptions=*) if [[ -n "$v" ]]; then user_exec_jopts+=("$v"); fi ;;
                *) spark_opts+=("$name" "$val") ;;
            esac
            ;;
        *) spark_opts+=("$name" "$val") ;;
    esac
done
job_args=("${args[@]:i}")

if [[ -z "$app" ]]; then
    if (( want_help )); then
        # Let Spark print its own help / version.
        source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
        exec "$SPARK_HOME/bin/spark-submit" "$@"
    fi
    usage
    exit 2
fi
if [[ "$app" != *.py ]]; then
    echo "sparkgd: error: expected a Python application file (*.py) after the spark-submit options, got '$app'" >&2
    usage
    exit 2
fi
if [[ "$app" != *://* && ! -f "$app" ]]; then
    echo "sparkgd: error: application file not found: $app" >&2
    exit 2
fi

source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"

# log4j2 takes a URI; escape spaces, which would also split the java options string.
log4j_uri="file:${SPARKGD_LOG4J// /%20}"
log4j_opt="-Dlog4j.configurationFile=$log4j_uri"

join_by() { local IFS="$1"; shift; echo "$*"; }

pyfiles="$(join_by , "$SPARKGD_PYFILES" ${user_pyfiles[@]+"${user_pyfiles[@]}"})"
driver_jopts="$(join_by ' ' "$log4j_opt" ${user_driver_jopts[@]+"${user_driver_jopts[@]}"})"
exec_jopts="$(join_by ' ' "$log4j_opt" ${user_exec_jopts[@]+"${user_exec_jopts[@]}"})"

cmd=("$SPARK_HOME/bin/spark-submit")
if (( ! user_master )); then
    cmd+=(--master 'local[*]')
    # A local run serves nobody else: keep the driver (and its UI) on loopback.
    export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
fi
cmd+=(
    --py-files "$pyfiles"
    --driver-java-options "$driver_jopts"
    --conf "spark.executor.extraJavaOptions=$exec_jopts"
    --conf spark.ui.showConsoleProgress=false
    --conf "spark.pyspark.python=$PYSPARK_PYTHON"
    --conf "spark.pyspark.driver.python=$PYSPARK_PYTHON"
    ${spark_opts[@]+"${spark_opts[@]}"}
    "$app"
    ${job_args[@]+"${job_args[@]}"}
)

# If stderr is a regular file, reopen it in append mode: the JVM, the filter below and
# the Python driver (through SPARKGD_STDERR) then all write at its end instead of over
# each other's lines.
if [[ -f /dev/stderr && -e "/proc/$$/fd/2" ]]; then
    exec 2>>"/proc/$$/fd/2"
fi

# Spark's PythonRunner starts the Python driver with its stderr merged into the JVM's
# stdout (ProcessBuilder.redirectErrorStream), so whatever the job writes to sys.stderr
# lands on stdout. To keep the real stderr reachable from the job: fd 3 of this process
# -- which after the exec chain below is the driver JVM itself, the parent of the Python
# driver -- is a copy of it, and SPARKGD_STDERR names it (/proc/<pid>/fd/3, Linux only).
# A job that wants its errors on stderr opens that path (O_WRONLY|O_APPEND) and dup2()s
# it onto fd 2 at startup; without it (other OS, plain spark-submit) it keeps fd 2.
exec 3>&2
if [[ -e "/proc/$$/fd/3" ]]; then
    export SPARKGD_STDERR="/proc/$$/fd/3"
else
    unset SPARKGD_STDERR
fi

if [[ -n "${SPARKGD_DEBUG:-}" ]]; then
    printf 'sparkgd: exec:' >&2
    printf ' %q' "${cmd[@]}" >&2
    printf '\n' >&2
else
    # Spark's launcher always starts the driver JVM with --add-modules=jdk.incubator.vector,
    # and the JVM then prints "WARNING: Using incubator modules: jdk.incubator.vector" on
    # stderr, with no switch to turn it off. Drop exactly that line from the JVM's stderr;
    # everything else passes through unchanged (SPARKGD_STDERR bypasses the filter). The
    # filter ignores SIGINT so that on Ctrl-C it outlives the job and forwards its last
    # words. spark-submit is still exec'ed, so its exit status is this script's.
    exec 2> >(trap '' INT; exec grep --line-buffered -v -x -e 'WARNING: Using incubator modules: jdk\.incubator\.vector' >&2)
fi
exec "${cmd[@]}"
