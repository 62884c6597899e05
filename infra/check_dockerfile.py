#!/usr/bin/env python3
"""Static review of the Dockerfile and .dockerignore (CI has no container engine to build with).

Asserts what the image promises:
  * a multi-stage build whose final stage runs as a non-root USER, from a minimal base that keeps
    glibc and CA certificates: distroless/cc (which has both), or Debian slim installing
    ca-certificates, on the build image's Debian release;
  * the shipped binary has no debug info: the release profile leaves none, or the build stage
    strips the copied binary after `cargo build` (strip, objcopy --strip-debug/--strip-all, or
    Cargo's strip setting); a split-off debug file (.debug, .dwp) never enters the final stage;
  * the final stage takes only the built binary from the build stage: no sources from the build
    context, no compiler or build tools installed;
  * HEALTHCHECK, ENTRYPOINT and CMD in exec form (so SIGTERM reaches `tradeeon` as PID 1), and a
    `healthcheck` subcommand that exists in the CLI;
  * the build stage copies everything `cargo build --locked` needs: the manifests, every workspace
    member and path dependency, every declared target path, and the directories sqlx::migrate!
    and include_bytes! embed; and .dockerignore lets all of that through while keeping target/, .git, .env files
    and local databases out of the context;
  * the Rust toolchain is at least the workspace's rust-version.

Usage: python3 infra/check_dockerfile.py
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

BUILD_TOOLS = re.compile(r"\b(cargo|rustc|rustup|gcc|g\+\+|clang|make|cmake|build-essential|pkg-config|git|curl|wget)\b")
RUNTIME_PACKAGES = {"ca-certificates", "tzdata"}
# distroless/<variant>-debian<N>: the variants with glibc. `cc` adds libgcc_s, which Rust binaries
# link (unwinding); `static` has no libc at all.
DISTROLESS_GLIBC_VARIANTS = {"cc"}
DEBIAN_CODENAMES = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
DEBUG_FILE_SUFFIXES = (".debug", ".dwp", ".dSYM")
# Never part of the build context.
MUST_BE_IGNORED = [".git/config", "target/release/tradeeon", ".env", ".venv/bin/python", "data/tradeeon.db",
                   "data/encryption.key", "shared/target/x", "node_modules/x/index.js"]

failures: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip(), start)
        logical = ""
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if instruction.keyword == "ARG" and "=" in instruction.arguments:
                key, _, value = instruction.arguments.partition("=")
                args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(instruction)
    return args, stages


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def exec_form(arguments: str) -> list[str] | None:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def copy_sources(instruction: Instruction) -> tuple[list[str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD."""
    words = instruction.arguments.split()
    flags = [w for w in words if w.startswith("--")]
    rest = [w for w in words if not w.startswith("--")]
    return flags, rest[:-1], rest[-1] if rest else ""


# --- .dockerignore, matched the way the Docker builder does (last matching pattern wins; a pattern
# also matches a file when it matches one of its parent directories) ---
def ignore_patterns() -> list[tuple[bool, re.Pattern[str], int]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        line = str(PurePosixPath(line))
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**", i):
                regex += ".*"
                i += 2
                if line.startswith("/", i):
                    regex = regex[:-2] + "(.*/)?"
                    i += 1
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((negated, re.compile(f"^{regex}$"), len(line.split("/"))))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str], int]]) -> bool:
    parts = path.split("/")
    result = False
    for negated, regex, depth in patterns:
        matched = bool(regex.match(path))
        if not matched and len(parts) > 1 and depth <= len(parts) - 1:
            matched = bool(regex.match("/".join(parts[:depth])))
        if matched:
            result = not negated
    return result


def workspace_inputs() -> tuple[set[str], str]:
    """Top-level paths `cargo build --locked --bin tradeeon` reads, and the workspace rust-version."""
    root_manifest = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    needed = {"Cargo.toml", "Cargo.lock"}
    packages = [Path(".")]
    workspace = root_manifest.get("workspace", {})
    packages += [Path(member) for member in workspace.get("members", [])]
    for dep in workspace.get("dependencies", {}).values():
        if isinstance(dep, dict) and "path" in dep:
            packages.append(Path(dep["path"]))
    rust_version = workspace.get("package", {}).get("rust-version", "")

    for package in packages:
        manifest_path = ROOT / package / "Cargo.toml"
        if not manifest_path.exists():
            failures.append(f"{package}/Cargo.toml does not exist")
            continue
        needed.add(str(PurePosixPath(package.as_posix(), "Cargo.toml")))
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
        if package != Path("."):
            needed.add(package.as_posix())
        # Declared targets must exist when cargo loads the manifest, whichever target it builds.
        for kind in ("bin", "lib", "test", "bench", "example"):
            targets = manifest.get(kind, [])
            for target in targets if isinstance(targets, list) else [targets]:
                if "path" in target:
                    needed.add((package / target["path"]).as_posix())
        build = manifest.get("package", {}).get("build")
        if isinstance(build, str):
            needed.add((package / build).as_posix())
    # sqlx::migrate!("dir") embeds dir, relative to the manifest of the crate the call is in.
    for source in ROOT.rglob("*.rs"):
        relative = source.relative_to(ROOT)
        if any(part in ("target", "node_modules") or part.startswith(".") for part in relative.parts):
            continue
        manifest_dir = next(d for d in source.parents if (d / "Cargo.toml").exists())
        text = source.read_text(encoding="utf-8")
        for rel in re.findall(r'sqlx::migrate!\(\s*"([^"]+)"\s*\)', text):
            needed.add((manifest_dir / rel).resolve().relative_to(ROOT).as_posix())
        # include_bytes!/include_str! of files outside the crate (the web UI's assets), written
        # as concat!(env!("CARGO_MANIFEST_DIR"), "/../dir/", ...).
        for rel in re.findall(r'concat!\(\s*env!\("CARGO_MANIFEST_DIR"\)\s*,\s*"/([^"]+)"', text):
            needed.add((manifest_dir / rel).resolve().relative_to(ROOT).as_posix())
    needed.add("src")  # the root package's default binary (src/main.rs)
    return {path.split("/")[0] if "/" in path else path for path in needed}, rust_version


def debian_release(image: str) -> str:
    """`trixie` for rust:1.95-slim-trixie, debian:trixie-slim and gcr.io/distroless/cc-debian13."""
    distroless = re.search(r"distroless/[\w.]+-debian(\d+)", image)
    if distroless:
        return DEBIAN_CODENAMES.get(distroless.group(1), f"debian{distroless.group(1)}")
    words = [w for w in image.split(":")[-1].split("-") if w != "slim" and not re.match(r"\d", w)]
    return words[-1] if words else ""


def cargo_strips_release() -> bool:
    """Whether `cargo build --release` already leaves no debug info in the binary (Cargo.toml)."""
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    release = manifest.get("profile", {}).get("release", {})
    strip, debug = release.get("strip"), release.get("debug")
    if strip in (True, "debuginfo", "symbols"):
        return True
    # Without debug info requested, Cargo strips what the standard library brings (strip = "debuginfo").
    return debug in (None, False, 0, "none") and strip is None


def build_strips(build: Stage, binary: str) -> bool:
    """Whether the build stage removes the debug info of `binary`, the path the final stage copies."""
    texts = [i.arguments for i in build.instructions if i.keyword in ("RUN", "ENV", "ARG")]
    joined = " ".join(texts)
    # Cargo's own strip setting, from the environment or --config.
    if re.search(r"CARGO_PROFILE_RELEASE_STRIP[= ]\"?(true|debuginfo|symbols)\b", joined):
        return True
    if re.search(r"--config[= ]['\"]?profile\.release\.strip\s*=\s*['\"]?(true|debuginfo|symbols)\b", joined):
        return True
    # Or strip/objcopy on the copied binary, after cargo built it.
    name = PurePosixPath(binary).name
    stripping = re.compile(
        r"\b(?:strip(?:\s+(?:--strip-(?:debug|all|unneeded)|-[gsSx]|--\S+))*"
        r"|objcopy(?:\s+--?\S+)*?\s+(?:--strip-(?:debug|all|unneeded)|-[gS])(?:\s+--?\S+)*)"
        r"\s+(\S+)\s*(?:$|&&|;|\|)"
    )
    for text in (i.arguments for i in build.instructions if i.keyword == "RUN"):
        built = re.search(r"cargo build\b", text)
        for match in stripping.finditer(text):
            target = match.group(1)
            if (target == binary or PurePosixPath(target).name == name) and built and match.start() > built.start():
                return True
    return False


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def main() -> int:
    args, stages = parse(DOCKERFILE.read_text(encoding="utf-8"))
    check(len(stages) >= 2, "the Dockerfile must be a multi-stage build")
    if len(stages) < 2:
        return report()
    build, final = stages[0], stages[-1]
    names = {s.name for s in stages if s.name}

    # Final stage: minimal, glibc and CA certificates, non-root, only the binary.
    final_base = expand(final.base, args)
    check("rust" not in final_base.split(":")[0], f"the final stage must not be a Rust toolchain image ({final_base})")
    check("slim" in final_base or "distroless" in final_base, f"the final stage should use a slim base ({final_base})")
    distroless = re.search(r"distroless/([\w.]+?)(?:-debian\d+)?(?::|$)", final_base)
    if distroless:
        check(
            distroless.group(1) in DISTROLESS_GLIBC_VARIANTS,
            f"the final stage's distroless/{distroless.group(1)} lacks what the glibc-linked binary needs; use distroless/cc",
        )
    else:
        installs = " ".join(i.arguments for i in final.instructions if i.keyword == "RUN")
        check(
            re.search(r"apt-get install [^&;|]*\bca-certificates\b", installs) is not None,
            f"the final stage ({final_base}) must install ca-certificates (TLS to the exchanges, AWS and PostgreSQL)",
        )
    users = [i.arguments for i in final.instructions if i.keyword == "USER"]
    check(bool(users), "the final stage must set a USER")
    if users:
        user = users[-1].split(":")[0]
        check(user not in ("root", "0"), f"the final stage runs as {users[-1]}; it must be an unprivileged user")
    for instruction in final.instructions:
        if instruction.keyword == "ADD":
            failures.append(f"line {instruction.line}: ADD in the final stage; COPY --from the build stage only")
        if instruction.keyword == "COPY":
            flags, sources, _ = copy_sources(instruction)
            origin = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            check(
                bool(origin) and origin[0] in names,
                f"line {instruction.line}: the final stage copies {sources} from the build context; only built artifacts may enter it",
            )
            check(
                all(not s.rstrip("/").endswith(("src", "build", "target", "shared", "api", "worker")) for s in sources),
                f"line {instruction.line}: the final stage copies a source or build directory ({sources})",
            )
        if instruction.keyword == "RUN":
            command = instruction.arguments
            installs = re.findall(r"apt-get install ([^&;|]+)", command)
            packages = {w for part in installs for w in part.split() if not w.startswith("-")}
            check(
                packages <= RUNTIME_PACKAGES,
                f"line {instruction.line}: the final stage installs {sorted(packages - RUNTIME_PACKAGES)}; only runtime packages belong there",
            )
            without_installs = re.sub(r"apt-get install [^&;|]+", "", command)
            tool = BUILD_TOOLS.search(without_installs)
            check(tool is None, f"line {instruction.line}: the final stage runs a build tool ({tool.group(0) if tool else ''})")

    healthchecks = [i for i in final.instructions if i.keyword == "HEALTHCHECK"]
    check(len(healthchecks) == 1, "the final stage needs exactly one HEALTHCHECK")
    for instruction in healthchecks:
        command = instruction.arguments.split("CMD", 1)[-1].strip() if "CMD" in instruction.arguments else ""
        form = exec_form(command)
        check(form is not None, f"line {instruction.line}: HEALTHCHECK CMD must be in exec form (a JSON array)")
        if form:
            check(form[-1] == "healthcheck", f"line {instruction.line}: HEALTHCHECK should run `tradeeon healthcheck`")
            cli = (ROOT / "src" / "cli.rs").read_text(encoding="utf-8")
            check(re.search(r"^\s*Healthcheck\b", cli, re.M) is not None, "src/cli.rs has no `healthcheck` subcommand for HEALTHCHECK")
    for keyword in ("ENTRYPOINT", "CMD"):
        found = [i for i in final.instructions if i.keyword == keyword]
        check(bool(found), f"the final stage needs {keyword}")
        for instruction in found:
            check(exec_form(instruction.arguments) is not None, f"line {instruction.line}: {keyword} must be in exec form so SIGTERM reaches tradeeon")
    entrypoint = [exec_form(i.arguments) for i in final.instructions if i.keyword == "ENTRYPOINT"]
    final_copies = [copy_sources(i) for i in final.instructions if i.keyword == "COPY"]
    binary_copies = [destination for _, _, destination in final_copies]
    if entrypoint and entrypoint[-1]:
        check(entrypoint[-1][0] in binary_copies, f"ENTRYPOINT runs {entrypoint[-1][0]}, which the final stage does not copy in")
    # No debug info in the image: stripped in the build stage, the split-off file left behind.
    for _, sources, _ in final_copies:
        for source in sources:
            check(not source.endswith(DEBUG_FILE_SUFFIXES), f"the final stage copies the debug file {source}")
    if entrypoint and entrypoint[-1]:
        shipped = [
            source
            for flags, sources, destination in final_copies
            if destination == entrypoint[-1][0] and any(f == f"--from={build.name}" for f in flags)
            for source in sources
        ]
        check(
            bool(shipped) and (cargo_strips_release() or all(build_strips(build, source) for source in shipped)),
            f"the binary the final stage copies ({', '.join(shipped) or 'none from the build stage'}) keeps the debug info "
            "the release profile builds in; strip it in the build stage (or keep a split-off debug file there)",
        )
    check(any(i.keyword == "EXPOSE" and "8000" in i.arguments.split() for i in final.instructions), "the final stage should EXPOSE 8000")

    # Build stage: every input cargo reads, a locked release build, a new enough toolchain.
    copied: set[str] = set()
    for instruction in build.instructions:
        if instruction.keyword in ("COPY", "ADD"):
            flags, sources, _ = copy_sources(instruction)
            if not any(f.startswith("--from=") for f in flags):
                copied |= {s.rstrip("/").removeprefix("./") for s in sources}
    check("." not in copied, "the build stage should copy the workspace paths, not the whole context")
    needed, rust_version = workspace_inputs()
    missing = sorted(needed - copied)
    check(not missing, f"the build stage does not copy {missing}, which `cargo build` needs")
    runs = " ".join(i.arguments for i in build.instructions if i.keyword == "RUN")
    check(re.search(r"cargo build\b[^&;]*--release", runs) is not None, "the build stage must run cargo build --release")
    check(re.search(r"cargo build\b[^&;]*--locked", runs) is not None, "the build stage must build with --locked (Cargo.lock as committed)")
    build_base = expand(build.base, args)
    toolchain = build_base.split(":")[-1].split("-")[0]
    if rust_version and re.match(r"\d", toolchain):
        check(
            version_tuple(toolchain) >= version_tuple(rust_version),
            f"the build image's Rust {toolchain} is older than the workspace's rust-version {rust_version}",
        )
    check(
        debian_release(build_base) == debian_release(final_base),
        f"build ({build_base}) and runtime ({final_base}) should share a Debian release (glibc)",
    )

    # .dockerignore: lets the inputs through, keeps the rest out.
    check(DOCKERIGNORE.exists(), ".dockerignore is missing")
    if DOCKERIGNORE.exists():
        patterns = ignore_patterns()
        for path in sorted(needed):
            probe = path if (ROOT / path).is_file() else f"{path}/x.rs"
            check(not ignored(probe, patterns), f".dockerignore excludes {path}, which the build needs")
        for path in MUST_BE_IGNORED:
            check(ignored(path, patterns), f".dockerignore lets {path} into the build context")
    return report()


def report() -> int:
    if failures:
        print("Dockerfile review failed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("Dockerfile and .dockerignore: static review passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
