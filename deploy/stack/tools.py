"""The programs the stack runs: Java and Maven for Kafka, PostgreSQL's server binaries.
Missing ones are installed with apt-get when we are root (a fresh CI machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .layout import relative
from .output import StackError, say

KAFKA_VERSION = "4.1.1"
KAFKA_ARTIFACT = f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}"
PG_PREFERRED_MAJOR = "15"


def apt_install(packages: list[str], why: str, log: Path) -> bool:
    """Install Debian packages when we are root and apt-get exists. Returns success."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"{why}: installing {' '.join(packages)} with apt-get (log: {relative(log)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(log, "ab") as out:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL).returncode:
                return False
    return True


def need_java(apt_log: Path) -> str:
    java = shutil.which("java")
    if java is None and apt_install(["openjdk-17-jre-headless"], "java not found", apt_log):
        java = shutil.which("java")
    if java is None:
        raise StackError("java not found (Kafka needs a Java 17+ runtime on PATH)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        version = out.split('"')[1]
        major = int(version.split(".")[0]) if not version.startswith("1.") else int(version.split(".")[1])
    except (IndexError, ValueError):
        major = 0
    if major and major < 17:
        raise StackError(f"java {version} found, but Kafka {KAFKA_VERSION} needs Java 17+")
    return java


def need_maven(apt_log: Path) -> str:
    mvn = shutil.which("mvn")
    if mvn is None and apt_install(["maven"], "mvn not found", apt_log):
        mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(f"mvn not found (Maven is needed once, to fetch {KAFKA_ARTIFACT})")
    return mvn


def pg_bindir() -> Path | None:
    if os.environ.get("RUNSTATE_PG_BINDIR"):
        return Path(os.environ["RUNSTATE_PG_BINDIR"])
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = sorted((d for d in root.iterdir() if (d / "bin" / "postgres").exists()),
                        key=lambda d: (d.name != PG_PREFERRED_MAJOR, -int(d.name) if d.name.isdigit() else 0))
        if majors:
            return majors[0] / "bin"
    found = shutil.which("postgres")
    return Path(found).parent if found and shutil.which("initdb") else None


def need_pg_bindir(apt_log: Path) -> Path:
    bindir = pg_bindir()
    if bindir is None:
        # Debian's postgresql package would create and start a system "main" cluster; we only
        # want the binaries.
        conf = Path("/etc/postgresql-common/createcluster.conf")
        if os.geteuid() == 0 and not conf.exists():
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text("create_main_cluster = false\n")
        if apt_install(["postgresql"], "PostgreSQL server binaries not found", apt_log):
            bindir = pg_bindir()
    if bindir is None:
        raise StackError("PostgreSQL server binaries not found (initdb/postgres): apt-get install -y postgresql")
    return bindir
