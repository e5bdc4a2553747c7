#!/usr/bin/env bash
# Compiles spec-core with kotlinc and runs its JUnit 4 tests; no Gradle, no Android SDK.
# Installs what is missing: kotlinc 2.4.20 from npm (into a cache folder) and, as root, Debian's
# junit4 + libhamcrest-java. Works from any directory. The last line is "N passed, N failed";
# the exit status is non-zero when a test fails or nothing ran.
#
# Environment: EDGE_MTP_TOOLS (where kotlinc is installed; default ~/.cache/edge-mtp),
#              KOTLINC (use this kotlinc instead of installing one).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KOTLIN_VERSION=2.4.20
TOOLS="${EDGE_MTP_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-mtp}/kotlin-$KOTLIN_VERSION"
BUILD="$HERE/build/kotlinc"

log() { echo "[spec-core] $*" >&2; }

# --- kotlinc: the npm package ships the full JVM compiler under lib/ and bin/ (its npm "bin" only links kotlinc-js).
KOTLIN_HOME="$TOOLS/node_modules/kotlin-compiler"
if [[ -n "${KOTLINC:-}" ]]; then
    KOTLIN_HOME="$(cd "$(dirname "$KOTLINC")/.." && pwd)"
elif [[ ! -x "$KOTLIN_HOME/bin/kotlinc" ]]; then
    command -v npm >/dev/null || { log "npm is needed to install kotlinc"; exit 2; }
    log "installing kotlin-compiler@$KOTLIN_VERSION into $TOOLS"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error "kotlin-compiler@$KOTLIN_VERSION" >&2
fi
KOTLINC="$KOTLIN_HOME/bin/kotlinc"
STDLIB="$KOTLIN_HOME/lib/kotlin-stdlib.jar"

# --- JUnit 4 and Hamcrest from Debian.
JUNIT=/usr/share/java/junit4.jar
HAMCREST=/usr/share/java/hamcrest-core.jar
if [[ ! -f "$JUNIT" || ! -f "$HAMCREST" ]]; then
    if [[ "$(id -u)" != 0 ]]; then log "missing $JUNIT: run 'apt-get install junit4 libhamcrest-java' as root"; exit 2; fi
    log "installing junit4 and libhamcrest-java"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq junit4 libhamcrest-java) >&2
fi
command -v java >/dev/null || { log "java (17+) is needed"; exit 2; }

# --- Compile main, then tests against it (tests see main's internals, as in Gradle).
rm -rf "$BUILD"
mkdir -p "$BUILD/main" "$BUILD/test"
export JAVA_OPTS="${JAVA_OPTS:--Xmx1g}"
compile_failed() { log "compilation failed"; echo "0 passed, 1 failed"; exit 1; }
log "compiling main"
"$KOTLINC" -nowarn -jvm-target 17 -d "$BUILD/main" $(find "$HERE/src/main/kotlin" -name '*.kt' | sort) || compile_failed
log "compiling tests"
"$KOTLINC" -nowarn -jvm-target 17 -cp "$BUILD/main:$JUNIT:$HAMCREST" -Xfriend-paths="$BUILD/main" \
    -d "$BUILD/test" $(find "$HERE/src/test/kotlin" -name '*.kt' | sort) || compile_failed

# --- Run every *Test class.
CLASSES=$(cd "$BUILD/test" && find . -name '*Test.class' ! -name '*$*' | sed 's|^\./||; s|\.class$||; s|/|.|g' | sort)
[[ -n "$CLASSES" ]] || { log "no test classes found"; echo "0 passed, 0 failed"; exit 1; }
set +e
java -cp "$BUILD/test:$BUILD/main:$STDLIB:$JUNIT:$HAMCREST" -Dedgemtp.testdata="$HERE/testdata" \
    org.junit.runner.JUnitCore $CLASSES | tee "$BUILD/junit.log"
STATUS=${PIPESTATUS[0]}
set -e

# JUnit ends with "OK (N tests)" or "Tests run: N,  Failures: F".
if RUN=$(grep -oE '^OK \(([0-9]+) tests?\)' "$BUILD/junit.log" | grep -oE '[0-9]+'); then
    FAILED=0
else
    RUN=$(grep -oE 'Tests run: [0-9]+' "$BUILD/junit.log" | grep -oE '[0-9]+' | tail -n 1 || echo 0)
    FAILED=$(grep -oE 'Failures: [0-9]+' "$BUILD/junit.log" | grep -oE '[0-9]+' | tail -n 1 || echo 0)
fi
RUN=${RUN:-0}; FAILED=${FAILED:-0}
echo "$((RUN - FAILED)) passed, $FAILED failed"
if [[ "$STATUS" != 0 || "$FAILED" != 0 || "$RUN" == 0 ]]; then exit 1; fi
