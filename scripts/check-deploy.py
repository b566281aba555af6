#!/usr/bin/env python3
"""Checks deploy/ against real tools and the real binaries (run through check-deploy.sh).

1. Linters: hadolint (image build files), yamllint, kubernetes-validate --strict (Kubernetes
   schemas, offline), `docker compose config` (the compose spec), shellcheck, and
   `systemd-analyze verify` / `security --offline` on the unit.
2. Non-root: every image's final stage runs as a numeric non-zero user; the Kubernetes pod
   and the compose services say so too.
3. Interfaces: every flag and environment variable that the unit, its env file, the
   Deployment, the compose file, up.sh and deploy/README.md's commands give a binary is one
   that binary accepts (its --help), and every probe path answers 200 on a real server.
"""

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# Environment variables a binary reads through a library rather than clap (so --help need
# not list them), with the library and a pattern in the binary's crate sources that shows it
# asks the library to read them.
S3_FROM_ENV = ("object_store's AmazonS3Builder::from_env", r"AmazonS3Builder::from_env")
LIBRARY_ENV = {
    "RUST_LOG": ("tracing-subscriber's EnvFilter", r"EnvFilter::(try_)?from_default_env"),
    "AWS_ACCESS_KEY_ID": S3_FROM_ENV,
    "AWS_SECRET_ACCESS_KEY": S3_FROM_ENV,
    "AWS_REGION": S3_FROM_ENV,
    "AWS_ENDPOINT_URL": S3_FROM_ENV,
    "AWS_ALLOW_HTTP": S3_FROM_ENV,
}

# The two binaries and their crates' sources.
SERVER = "faultline-server"
CLIENT = "faultline"
SOURCES = {SERVER: ROOT / "server/src", CLIENT: ROOT / "client/src"}

# Where the built binaries are (--bin-dir).
BIN_DIR = Path("target/debug")

# How long a probe server may take to start answering (it binds at once; the margin is for a
# loaded machine).
PROBE_START_TIMEOUT_S = 20


class Report:
    """Counts and prints results."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, what):
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what, why=""):
        self.failed += 1
        print(f"  FAIL  {what}{': ' + why if why else ''}")


    def check(self, cond, what, why=""):
        if cond:
            self.ok(what)
        else:
            self.fail(what, why)
        return cond


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def tool_output(result):
    return (result.stdout + result.stderr).strip()


# ---------------------------------------------------------------------------------------
# 1. Linters
# ---------------------------------------------------------------------------------------


def dockerfiles():
    return sorted(DEPLOY.rglob("*.Dockerfile"))


def lint(r, tools):
    print("linters")
    for f in dockerfiles():
        res = run([str(tools / "hadolint"), str(f)])
        r.check(res.returncode == 0, f"hadolint {f.relative_to(ROOT)}", tool_output(res))

    yamls = sorted((DEPLOY / "kubernetes").glob("*.yaml")) + sorted(
        (DEPLOY / "compose").glob("*.yaml")
    )
    res = run([str(tools / "yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint")]
              + [str(y) for y in yamls])
    r.check(res.returncode == 0, f"yamllint --strict on {len(yamls)} files", tool_output(res))

    for y in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        res = run([str(tools / "kubernetes-validate"), "--strict", "--quiet", str(y)])
        r.check(res.returncode == 0, f"kubernetes-validate --strict {y.relative_to(ROOT)}",
                tool_output(res))

    compose_file = DEPLOY / "compose/compose.yaml"
    # Placeholders for what up.sh writes into .env (the file refuses to render without them).
    env = dict(os.environ, FAULTLINE_S3_KEY_ID="GK000000000000000000000000",
               FAULTLINE_S3_SECRET="0" * 64, GARAGE_RPC_SECRET="0" * 64)
    res = run([str(tools / "docker-compose"), "-f", str(compose_file), "config", "-q"], env=env)
    r.check(res.returncode == 0, "docker compose config (compose spec)", tool_output(res))

    scripts = sorted(DEPLOY.rglob("*.sh")) + [ROOT / "scripts/check-deploy.sh"]
    res = run([str(tools / "shellcheck")] + [str(s) for s in scripts])
    r.check(res.returncode == 0, f"shellcheck on {len(scripts)} scripts", tool_output(res))


def systemd(r, bin_dir):
    print("systemd unit")
    unit = DEPLOY / "faultline-server.service"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        r.fail("systemd-analyze", "not installed (apt-get install systemd)")
        return
    text = unit.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        # verify insists that ExecStart's binary exists: point it at the one just built.
        copy = Path(tmp) / unit.name
        copy.write_text(text.replace("/usr/local/bin/faultline-server",
                                     str((bin_dir / SERVER).resolve())))
        res = run([analyze, "verify", "--man=no", str(copy)])
        out = tool_output(res)
        r.check(res.returncode == 0 and not out, "systemd-analyze verify", out)
        # The exposure score of the sandbox (0 = locked down, 10 = none). What remains is a
        # network server's own: it listens on the network (PrivateNetwork, IPAddressDeny,
        # socket families) and reads the host's root (no RootDirectory); see deploy/README.md.
        res = run([analyze, "security", "--offline=true", "--threshold=20", "--no-pager",
                   str(copy)])
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
        level = float(m.group(1)) if m else None
        r.check(res.returncode == 0 and level is not None and level <= 2.0,
                f"systemd-analyze security --offline: exposure {level} (at most 2.0)",
                tool_output(res)[-2000:])


# ---------------------------------------------------------------------------------------
# 2. Non-root
# ---------------------------------------------------------------------------------------


def final_stage(lines):
    start = max(i for i, line in enumerate(lines) if re.match(r"FROM\s", line, re.I))
    return lines[start:]


def image_binary(r, path, name, lines, stage):
    """The image builds a real binary of the workspace, copies it, and its ENTRYPOINT and CMD
    run: `cargo build --bin X`, `COPY ... /out/X`, `ENTRYPOINT ["/usr/local/bin/X"]`, and
    X with CMD's arguments exits 0 on the binary built here."""
    import json
    text = path.read_text()
    built = re.findall(r"cargo build[^\n]*--bin (\S+)", text)
    entry = [json.loads(line.split(None, 1)[1]) for line in stage
             if line.upper().startswith("ENTRYPOINT")]
    cmd = [json.loads(line.split(None, 1)[1]) for line in stage if line.upper().startswith("CMD")]
    ok = len(built) == 1 and entry and Path(entry[-1][0]).name == built[0] and any(
        line.upper().startswith("COPY") and line.endswith(f"/usr/local/bin/{built[0]}")
        for line in stage)
    if not r.check(ok, f"{name}: builds, copies and runs the workspace's {built}"):
        return
    binary = BIN_DIR / built[0]
    # The distroless "cc" image holds glibc (libc, libm, libdl, librt, libpthread, the loader)
    # and libgcc_s, nothing else: the binary must need no other shared library.
    res = run(["ldd", str(binary)])
    needed = sorted({m.group(1) for m in re.finditer(r"^\s*(\S+\.so[.0-9]*)", res.stdout, re.M)})
    allowed = re.compile(r"(linux-vdso|ld-linux-x86-64|lib(c|m|dl|rt|pthread|gcc_s))\.so")
    extra = [lib for lib in needed if not allowed.match(Path(lib).name)]
    r.check(res.returncode == 0 and not extra,
            f"{name}: {built[0]} links only what {stage[0].split()[1]} has", f"also needs {extra}")
    args = entry[-1][1:] + (cmd[-1] if cmd else [])
    res = run([str(binary)] + args)
    r.check(res.returncode == 0, f"{name}: `{built[0]} {' '.join(args)}` (ENTRYPOINT + CMD) runs",
            tool_output(res)[-500:])


def nonroot(r, deployment, compose):
    print("images and users")
    for f in dockerfiles():
        lines = [line.strip() for line in f.read_text().splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        stage = final_stage(lines)
        users = [line.split(None, 1)[1] for line in stage if re.match(r"USER\s", line, re.I)]
        name = f.relative_to(ROOT)
        if f.name == "garage-init.Dockerfile":
            # A one-shot setup container that must read Garage's root-owned node key.
            r.check(not users, f"{name}: runs as root on purpose (reads Garage's node key)")
            continue
        uid = users[-1].split(":")[0] if users else ""
        r.check(uid.isdigit() and int(uid) != 0, f"{name}: final stage USER {uid or '(none)'}",
                "needs a numeric non-zero USER (Kubernetes' runAsNonRoot checks numbers)")
        base = stage[0].split()[1]
        r.check(":nonroot" in base or "distroless" in base, f"{name}: minimal base {base}")
        image_binary(r, f, name, lines, stage)
    pod = deployment["spec"]["template"]["spec"]
    sc = pod.get("securityContext", {})
    r.check(sc.get("runAsNonRoot") is True and int(sc.get("runAsUser", 0)) != 0,
            "Deployment: runAsNonRoot with a non-zero runAsUser")
    for c in pod["containers"]:
        csc = c.get("securityContext", {})
        r.check(csc.get("allowPrivilegeEscalation") is False
                and csc.get("readOnlyRootFilesystem") is True
                and csc.get("capabilities", {}).get("drop") == ["ALL"],
                f"Deployment {c['name']}: no privilege escalation, read-only root, no capabilities")
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith("faultline"):
            user = str(svc.get("user", "0")).split(":")[0]
            r.check(user.isdigit() and int(user) != 0 and svc.get("read_only") is True,
                    f"compose {name}: user {user}, read-only")


# ---------------------------------------------------------------------------------------
# 3. Flags, environment variables, probes
# ---------------------------------------------------------------------------------------


class Binaries:
    """--help texts of the binaries' commands, cached."""

    def __init__(self, bin_dir):
        self.bin_dir = bin_dir
        self.cache = {}

    def binary_of(self, command):
        return CLIENT if command in ("restore", "fetch", "probe", "fc-handler") else SERVER

    def help(self, command):
        if command not in self.cache:
            binary = self.bin_dir / self.binary_of(command)
            res = run([str(binary)] + command.split() + ["--help"])
            # A missing subcommand prints an error and no option list: no flag matches.
            self.cache[command] = res.stdout if res.returncode == 0 else ""
        return self.cache[command]

    def has_flag(self, command, flag):
        return re.search(re.escape(flag) + r"(?![a-z0-9-])", self.help(command)) is not None

    def has_env(self, command, name):
        text = self.help(command)
        if f"[env: {name}=" in text or re.search(rf"\b{re.escape(name)}\b", text):
            return True
        if name in LIBRARY_ENV:
            _, pattern = LIBRARY_ENV[name]
            return any(re.search(pattern, f.read_text())
                       for f in SOURCES[self.binary_of(command)].rglob("*.rs"))
        return False


def check_flags(r, bins, command, flags, where):
    for flag in flags:
        what = f"{where}: {bins.binary_of(command)} {command} {flag}"
        if bins.has_flag(command, flag):
            r.ok(what)
        else:
            r.fail(what, f"`{bins.binary_of(command)} {command} --help` has no {flag}")


def check_env(r, bins, command, names, where):
    for name in sorted(set(names)):
        what = f"{where}: env {name} for {bins.binary_of(command)} {command}"
        if bins.has_env(command, name):
            r.ok(what)
        else:
            r.fail(what, "no such environment variable in --help, nor read through a "
                   "library this script knows (LIBRARY_ENV)")


def split_invocation(argv):
    """(command, [--flag, ...]) of an argument vector after the binary's name."""
    words = []
    for a in argv:
        if a.startswith("-"):
            break
        words.append(a)
    # Two-word commands: `token new`, `token list`.
    command = " ".join(words[:2]) if words[:1] == ["token"] else (words[0] if words else "")
    flags = list(dict.fromkeys(a.split("=", 1)[0] for a in argv if a.startswith("--")))
    return command, flags


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def flag_values(argv):
    values = {}
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            values[k] = v
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[a] = argv[i + 1]
    return values


def interfaces(r, bins, deployment, compose, configmap, secrets):
    print("flags and environment")
    # The systemd unit and its env file.
    unit = (DEPLOY / "faultline-server.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    argv = shlex.split(exec_start)[1:]
    command, flags = split_invocation(argv)
    r.check(command == "serve", f"unit: ExecStart runs `serve` ({command})")
    check_flags(r, bins, command, flags, "unit")
    env_lines = (DEPLOY / "faultline-server.env").read_text().splitlines()
    env_file = [m.group(1) for line in env_lines
                if (m := re.match(r"#?([A-Z][A-Z0-9_]*)=", line.strip()))]
    expanded = set(re.findall(r"\$\{([A-Z0-9_]+)\}", exec_start))
    for name in sorted(expanded):
        r.check(name in env_file, f"unit: ${{{name}}} is set by faultline-server.env")
    # What systemd only substitutes into ExecStart need not be something the binary reads.
    check_env(r, bins, "serve", [n for n in env_file if n not in expanded or
                                 n == "FAULTLINE_STORE"], "env file")

    # The Deployment.
    pod = deployment["spec"]["template"]["spec"]
    for c in pod["containers"]:
        command, flags = split_invocation(c["args"])
        check_flags(r, bins, command, flags, f"Deployment {c['name']}")
        names = [e["name"] for e in c.get("env", [])]
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                names += list(configmap["data"])
            if "secretRef" in src:
                s = secrets[src["secretRef"]["name"]]
                names += list(s.get("stringData", {})) + list(s.get("data", {}))
        check_env(r, bins, command, names, f"Deployment {c['name']}")
        values = flag_values(c["args"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for flag, port in (("--listen", "grpc"), ("--metrics-listen", "metrics")):
            r.check(flag in values and port_of(values[flag]) == ports.get(port),
                    f"Deployment: port {port} is {flag}'s", f"{flag} not given or elsewhere")
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            r.check(get["port"] in ("metrics", ports.get("metrics")),
                    f"Deployment: {probe} on the metrics listener ({get['port']})")
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for flag in ("--tls-cert", "--tls-key", "--client-ca", "--tokens"):
            if flag in values:
                r.check(any(values[flag].startswith(m + "/") for m in mounts),
                        f"Deployment: {flag} {values[flag]} is in a mounted volume")

    # Services of the compose file that run faultline.
    for name, svc in compose["services"].items():
        if not svc.get("image", "").startswith("faultline"):
            continue
        command, flags = split_invocation(svc["command"])
        check_flags(r, bins, command, flags, f"compose {name}")
        check_env(r, bins, command, list(svc.get("environment", {})), f"compose {name}")

    # up.sh's token, and the commands of deploy/README.md.
    up = (DEPLOY / "compose/up.sh").read_text()
    for m in re.finditer(r"\b(token new .*?)(?:\\\n|$)", up, re.M):
        check_flags(r, bins, "token new", re.findall(r"--[a-z][a-z0-9-]*", m.group(1)),
                    "up.sh")
    for argv0, env, argv in readme_commands():
        command, flags = split_invocation(argv)
        check_flags(r, bins, command, flags, f"README `{argv0} {command}`")
        check_env(r, bins, command, env, f"README `{argv0} {command}`")


def readme_commands():
    """(binary, environment names, argv) of every faultline command in deploy/README.md's
    code blocks (a command may follow `VAR=value` assignments)."""
    text = (DEPLOY / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            env = []
            while words and re.match(r"[A-Z][A-Z0-9_]*=", words[0]):
                env.append(words.pop(0).split("=", 1)[0])
            if words and words[0] in (SERVER, CLIENT):
                argv = words[1:]
                # Stop at shell plumbing.
                argv = argv[: next((i for i, a in enumerate(argv)
                                    if a in ("|", ">", "&&", ";")), len(argv))]
                out.append((words[0], env, argv))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probes(r, bin_dir, deployment):
    print("probes on a real server")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    paths = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    paths.add(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    with tempfile.TemporaryDirectory() as store:
        port = free_port()
        server = subprocess.Popen(
            [str(bin_dir / SERVER), "serve", "--store", store, "--listen", "127.0.0.1:0",
             "--metrics-listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if not wait_for_port(r, server, port):
                return
            for path in sorted(paths):
                status = http_status(port, path)
                what = f"GET {path} -> {status}"
                if status == 200:
                    r.ok(what)
                else:
                    r.fail(what, "a probe or scrape path of deploy/kubernetes must answer 200")
        finally:
            stop(server)


def make_pki(tmp):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, by
    openssl, in `tmp`."""
    def ossl(*args):
        res = run(["openssl", *args])
        if res.returncode != 0:
            raise RuntimeError("openssl " + " ".join(args) + ": " + tool_output(res))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ossl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=check-deploy CA",
         "-keyout", f"{tmp}/ca.key", "-out", f"{tmp}/ca.crt")
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("client", "clientAuth", "DNS:check-deploy")):
        ext = Path(tmp) / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        ossl("req", *ec, "-subj", f"/CN={name}", "-keyout", f"{tmp}/{name}.key",
             "-out", f"{tmp}/{name}.csr")
        ossl("x509", "-req", "-in", f"{tmp}/{name}.csr", "-CA", f"{tmp}/ca.crt",
             "-CAkey", f"{tmp}/ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", f"{tmp}/{name}.crt")


def flags_ready(r, bins, label, args):
    """Whether every flag of `args` is in --help; a missing one is a failure."""
    command, flags = split_invocation(args)
    missing = [f for f in flags if not bins.has_flag(command, f)]
    if missing:
        r.fail(label, f"{', '.join(missing)} missing")
    return not missing


def serve_as_configured(r, bin_dir, label, args, files, ca, hostnames, readiness, client=None):
    """Starts `faultline-server` with `args` as a file of deploy/ gives them, with listen
    addresses replaced by loopback ports, file paths by `files` (by base name) and the store
    by a directory; checks that TLS on the gRPC port verifies against `ca` for each of
    `hostnames` (with `client`'s certificate and key for mutual TLS) and that `readiness`
    answers on the metrics port."""
    import ssl
    grpc, metrics = free_port(), free_port()
    argv = []
    for a in joined(args):
        flag, _, value = a.partition("=")
        if flag == "--listen":
            value = f"127.0.0.1:{grpc}"
        elif flag == "--metrics-listen":
            value = f"127.0.0.1:{metrics}"
        elif value.startswith("/"):
            if Path(value).name not in files:
                r.fail(label, f"{flag} {value}: no file of that name made for the check")
                return
            value = files[Path(value).name]
        argv.append(f"{flag}={value}" if value else a)
    with tempfile.TemporaryDirectory() as store:
        env = dict(os.environ, FAULTLINE_STORE=store)
        server = subprocess.Popen([str(bin_dir / SERVER)] + argv, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if not wait_for_port(r, server, metrics):
                return
            r.ok(f"{label}: the server starts")
            for name in hostnames:
                ctx = ssl.create_default_context(cafile=ca)
                if client:
                    ctx.load_cert_chain(*client)
                ctx.set_alpn_protocols(["h2"])
                try:
                    with socket.create_connection(("127.0.0.1", grpc), timeout=5) as sock:
                        with ctx.wrap_socket(sock, server_hostname=name) as tls:
                            proto = tls.selected_alpn_protocol()
                    r.check(proto == "h2",
                            f"{label}: TLS as {name}, verified by the CA (ALPN {proto})")
                except (OSError, ssl.SSLError) as e:
                    r.fail(f"{label}: TLS as {name}", str(e))
            if client:
                r.check(refuses_without_certificate(grpc, ca, hostnames[0]),
                        f"{label}: a client without a certificate is refused (mutual TLS)")
            status = http_status(metrics, readiness)
            what = f"{label}: GET {readiness} -> {status}"
            if status == 200:
                r.ok(what)
            else:
                r.fail(what)
        finally:
            stop(server)


def joined(args):
    """`--flag value` pairs as `--flag=value`."""
    out = []
    for a in args:
        if out and out[-1].startswith("--") and "=" not in out[-1] and not a.startswith("-"):
            out[-1] += "=" + a
        else:
            out.append(a)
    return out


def unit_starts_a_server(r, bins, bin_dir):
    """The unit's ExecStart as systemd would run it: the env file's settings substituted, %d
    the directory of the credentials (made here)."""
    print("the systemd unit's ExecStart on a real server")
    unit = (DEPLOY / "faultline-server.service").read_text()
    settings = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$",
                               (DEPLOY / "faultline-server.env").read_text(), re.M))
    label = "unit ExecStart"
    with tempfile.TemporaryDirectory() as tmp:
        exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).replace("%d", tmp)
        args = [re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: settings[m.group(1)], a)
                for a in shlex.split(exec_start)[1:]]
        if not flags_ready(r, bins, label, args):
            return
        make_pki(tmp)
        res = run([str(bin_dir / SERVER), "token", "new", "--tokens", f"{tmp}/tokens",
                   "--snapshots", "*", "--rights", "read"])
        if not r.check(res.returncode == 0, "token new makes a tokens file", tool_output(res)):
            return
        files = {"tls.crt": f"{tmp}/server.crt", "tls.key": f"{tmp}/server.key",
                 "tokens": f"{tmp}/tokens", Path(settings["FAULTLINE_STORE"]).name: tmp}
        serve_as_configured(r, bin_dir, label, args, files, f"{tmp}/ca.crt", ["localhost"],
                            "/readyz")


def refuses_without_certificate(port, ca, hostname):
    """Whether the server on `port` ends a TLS session whose client sent no certificate (with
    TLS 1.3 the refusal arrives after the client's side of the handshake, on the first read;
    a server that accepts waits for HTTP/2's preface, and the read times out)."""
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            with ctx.wrap_socket(sock, server_hostname=hostname) as tls:
                return tls.recv(1) == b""
    except ssl.SSLError:
        return True
    except (TimeoutError, socket.timeout):
        return False


def deployment_starts_a_server(r, bins, bin_dir, deployment):
    """The Deployment's args, with a CA, server and client certificates and a tokens file made
    here."""
    print("the Deployment's arguments on a real server")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    label = "Deployment args"
    if not flags_ready(r, bins, label, c["args"]):
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_pki(tmp)
        tokens = Path(tmp) / "tokens"
        res = run([str(bin_dir / SERVER), "token", "new", "--tokens", str(tokens),
                   "--snapshots", "*", "--rights", "read"])
        if not r.check(res.returncode == 0, "token new makes a tokens file", tool_output(res)):
            return
        files = {"tls.crt": f"{tmp}/server.crt", "tls.key": f"{tmp}/server.key",
                 "ca.crt": f"{tmp}/ca.crt", "tokens": str(tokens)}
        serve_as_configured(r, bin_dir, label, c["args"], files, f"{tmp}/ca.crt",
                            ["localhost"], c["readinessProbe"]["httpGet"]["path"],
                            client=(f"{tmp}/client.crt", f"{tmp}/client.key"))


def compose_secrets_start_a_server(r, bins, bin_dir, compose):
    """`up.sh --secrets-only` in a copy of deploy/compose, then a compose service's command on
    the secrets it made: its certificate must verify for both services' names."""
    print("up.sh's secrets with the compose command on a real server")
    svc = compose["services"]["faultline-a"]
    label = "compose command"
    if not flags_ready(r, bins, label, svc["command"]):
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "compose"
        shutil.copytree(DEPLOY / "compose", copy,
                        ignore=shutil.ignore_patterns(".env", "secrets"))
        env = dict(os.environ, FAULTLINE_SERVER_BIN=str((bin_dir / SERVER).resolve()))
        res = run([str(copy / "up.sh"), "--secrets-only"], env=env)
        if not r.check(res.returncode == 0, "up.sh --secrets-only", tool_output(res)):
            return
        secrets = copy / "secrets"
        token = (secrets / "client.token").read_text().strip()
        r.check(token and "\n" not in token, "up.sh: secrets/client.token holds one token")
        dotenv = dict(line.split("=", 1) for line in (copy / ".env").read_text().split())
        r.check(re.fullmatch(r"GK[0-9a-f]{24}", dotenv.get("FAULTLINE_S3_KEY_ID", ""))
                is not None and re.fullmatch(r"[0-9a-f]{64}", dotenv.get("GARAGE_RPC_SECRET", ""))
                is not None, "up.sh: .env has a Garage key id and RPC secret of Garage's shapes")
        files = {p.name: str(p) for p in secrets.iterdir()}
        names = [n for n in compose["services"] if n.startswith("faultline")] + ["localhost"]
        serve_as_configured(r, bin_dir, label, svc["command"], files,
                            str(secrets / "ca.crt"), names, "/readyz")


def wait_for_port(r, server, port):
    deadline = time.monotonic() + PROBE_START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                r.fail("server start", "did not listen: " + server.stderr.read()[-1500:])
                return False
            time.sleep(0.1)


def http_status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return str(e)


def stop(server):
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir", type=Path, required=True, help="where the built binaries are")
    ap.add_argument("--tools", type=Path, required=True, help="the checkers' bin directory")
    args = ap.parse_args()
    r = Report()
    global BIN_DIR
    BIN_DIR = args.bin_dir

    k8s = DEPLOY / "kubernetes"
    deployment = load_all(k8s / "deployment.yaml")[0]
    configmap = load_all(k8s / "configmap.yaml")[0]
    secrets = {s["metadata"]["name"]: s for s in load_all(k8s / "secret.yaml")}
    compose = yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text())

    lint(r, args.tools)
    systemd(r, args.bin_dir)
    nonroot(r, deployment, compose)
    interfaces(r, Binaries(args.bin_dir), deployment, compose, configmap, secrets)
    probes(r, args.bin_dir, deployment)
    deployment_starts_a_server(r, Binaries(args.bin_dir), args.bin_dir, deployment)
    compose_secrets_start_a_server(r, Binaries(args.bin_dir), args.bin_dir, compose)
    unit_starts_a_server(r, Binaries(args.bin_dir), args.bin_dir)

    print(f"deploy: {r.passed} passed, {r.failed} failed")
    sys.exit(1 if r.failed else 0)


if __name__ == "__main__":
    main()
