#!/usr/bin/env python3
"""The whole session-broker journey from Python, against a real `session-broker dev` process.

Starts the broker on free loopback ports, reads the dev caller token from its banner, and then:
StartLogin, follow the authorization URL through the CIS2 simulator (with login_hint), ExchangeCode,
GetCurrentAal, GetPdsToken, GetApiToken("eps") refused with STEP_UP_REQUIRED (reason, metadata and
the clinician's message read from google.rpc.Status in the trailers), a step-up with a smartcard,
and GetApiToken("eps") again. Exits non-zero on the first mismatch.

    python journey.py [--broker PATH]      # default: target/debug/session-broker

The gRPC stubs are generated from proto/ into a temporary directory at start-up, so they always
match the contract in this repository.
"""

import argparse
import http.client
import importlib.resources
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_DIR = os.path.join(REPO, "proto")
PROTO_FILE = os.path.join(PROTO_DIR, "session_broker", "v1", "session_broker.proto")

USER = "656005750107"  # holds a passkey (AAL2) and a smartcard (AAL3)


class Mismatch(Exception):
    pass


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")
    print(f"   ok  {what} = {got!r}")


def step(text):
    print(f"\n-> {text}", flush=True)


def generate_stubs(out_dir):
    """Compiles the broker's proto with grpcio-tools; returns (messages, services) modules."""
    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc})")
    sys.path.insert(0, out_dir)
    from session_broker.v1 import session_broker_pb2, session_broker_pb2_grpc

    return session_broker_pb2, session_broker_pb2_grpc


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Broker:
    """A `session-broker dev` child process; its log goes to a file shown on failure."""

    def __init__(self, binary):
        grpc_port, http_port, sim_port, apim_port = free_ports(4)
        self.grpc_addr = f"127.0.0.1:{grpc_port}"
        self.callback = f"http://127.0.0.1:{http_port}/dev/callback"
        self.log = tempfile.NamedTemporaryFile(prefix="broker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "dev",
             "--grpc-addr", self.grpc_addr,
             "--http-addr", f"127.0.0.1:{http_port}",
             "--sim-addr", f"127.0.0.1:{sim_port}",
             "--apim-addr", f"127.0.0.1:{apim_port}"],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        self.token = self._read_token()

    def _read_token(self):
        found = {}

        def read():
            for line in self.proc.stdout:
                m = re.search(r"export TOKEN=(\S+)", line)
                if m:
                    found["token"] = m.group(1)
                    break
            # Keep draining so the broker never blocks on a full pipe.
            for _ in self.proc.stdout:
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 60
        while "token" not in found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Mismatch("the broker did not print its caller token; log: " + self.log.name)
            time.sleep(0.05)
        return found["token"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def dump_log(self):
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            sys.stderr.write(f.read()[-4000:])


def follow_to_callback(authorization_url, callback, uid, authenticator):
    """Plays the browser: GETs without following redirects until the Location is the callback,
    whose query it returns instead of loading it (ExchangeCode is this program's job)."""
    url = urllib.parse.urlsplit(authorization_url)
    query = urllib.parse.parse_qsl(url.query)
    query += [("login_hint", uid), ("sim_authenticator", authenticator)]
    nxt = urllib.parse.urlunsplit(url._replace(query=urllib.parse.urlencode(query)))
    for _ in range(8):
        if nxt.startswith(callback + "?"):
            return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(nxt).query))
        parts = urllib.parse.urlsplit(nxt)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        path = parts.path + ("?" + parts.query if parts.query else "")
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        location = resp.getheader("Location")
        if resp.status not in (301, 302, 303, 307, 308) or not location:
            raise Mismatch(f"{parts.scheme}://{parts.netloc}{parts.path} answered {resp.status}, not a redirect")
        print(f"   {resp.status} {parts.netloc}{parts.path} -> {urllib.parse.urlsplit(location).path}")
        nxt = urllib.parse.urljoin(nxt, location)
    raise Mismatch("too many redirects before the callback")


def status_details(err):
    """google.rpc.Status from the `grpc-status-details-bin` trailer: (ErrorInfo, LocalizedMessage)."""
    from google.rpc import error_details_pb2, status_pb2

    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        raise Mismatch("the error carries no grpc-status-details-bin trailer")
    status = status_pb2.Status.FromString(raw)
    info, message = None, None
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
        elif any_.Is(error_details_pb2.LocalizedMessage.DESCRIPTOR):
            message = error_details_pb2.LocalizedMessage()
            any_.Unpack(message)
    if info is None or message is None:
        raise Mismatch(f"details lack ErrorInfo or LocalizedMessage: {[d.type_url for d in status.details]}")
    return info, message


def journey(pb, rpc, broker):
    import grpc

    channel = grpc.insecure_channel(broker.grpc_addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = rpc.SessionBrokerStub(channel)
    auth = (("authorization", f"Bearer {broker.token}"),)
    Aal = pb.Aal

    step("StartLogin (AAL2)")
    started = stub.StartLogin(pb.StartLoginRequest(redirect_uri=broker.callback, required_aal=Aal.AAL_2), metadata=auth)
    expect("acr_values", started.acr_values, "AAL2_OR_AAL3_ANY")
    expect("step_up", started.step_up, False)

    step(f"sign in at the simulator as {USER} with a passkey")
    cb = follow_to_callback(started.authorization_url, broker.callback, USER, "PASSKEY")
    expect("callback carries state, code and iss", sorted(k for k in cb if k in ("state", "code", "iss")), ["code", "iss", "state"])

    step("ExchangeCode")
    ex = stub.ExchangeCode(pb.ExchangeCodeRequest(state=cb["state"], code=cb["code"], iss=cb["iss"]), metadata=auth)
    session_token = ex.session_token
    expect("session token issued", session_token.startswith("cis2sb_"), True)
    expect("user", ex.session.user.uid, USER)
    expect("session AAL", Aal.Name(ex.session.aal), "AAL_2")
    role_id = ex.session.selected_role.role_id
    print(f"   user {ex.session.user.name}, role {ex.session.selected_role.role_name}")

    step("GetCurrentAal")
    cur = stub.GetCurrentAal(pb.GetCurrentAalRequest(session_token=session_token), metadata=auth)
    expect("aal", Aal.Name(cur.aal), "AAL_2")
    expect("authenticator", cur.authenticator, "Passkey")

    step("GetPdsToken")
    pds = stub.GetPdsToken(pb.GetPdsTokenRequest(session_token=session_token), metadata=auth)
    expect("token_type", pds.token_type, "Bearer")
    expect("api", pds.api, "pds")
    expect("token aal", Aal.Name(pds.aal), "AAL_2")
    expect("NHSD-Session-URID header", pds.headers.get("NHSD-Session-URID"), role_id)

    step("GetApiToken eps (needs AAL3)")
    try:
        stub.GetApiToken(pb.GetApiTokenRequest(session_token=session_token, api="eps"), metadata=auth)
        raise Mismatch("GetApiToken eps succeeded at AAL2")
    except grpc.RpcError as err:
        expect("status code", err.code(), grpc.StatusCode.FAILED_PRECONDITION)
        info, message = status_details(err)
        expect("ErrorInfo.domain", info.domain, "session-broker")
        expect("ErrorInfo.reason", info.reason, "STEP_UP_REQUIRED")
        expect("metadata api", info.metadata.get("api"), "eps")
        expect("metadata required_aal", info.metadata.get("required_aal"), "AAL_3")
        expect("metadata current_aal", info.metadata.get("current_aal"), "AAL_2")
        expect("clinician message names the smartcard", "smartcard" in message.message, True)
        print(f"   clinician sees ({message.locale}): {message.message}")

    step("StartLogin to step up the same session for eps")
    started = stub.StartLogin(pb.StartLoginRequest(redirect_uri=broker.callback, api="eps", session_token=session_token), metadata=auth)
    expect("acr_values", started.acr_values, "AAL3_ANY")
    expect("step_up", started.step_up, True)
    cb = follow_to_callback(started.authorization_url, broker.callback, USER, "N3_SMARTCARD")
    ex = stub.ExchangeCode(pb.ExchangeCodeRequest(state=cb["state"], code=cb["code"], iss=cb["iss"]), metadata=auth)
    expect("stepped_up", ex.stepped_up, True)
    expect("no new session token", ex.session_token, "")

    step("GetCurrentAal after step-up")
    cur = stub.GetCurrentAal(pb.GetCurrentAalRequest(session_token=session_token), metadata=auth)
    expect("aal", Aal.Name(cur.aal), "AAL_3")
    expect("authenticator", cur.authenticator, "Smartcard")

    step("GetApiToken eps")
    eps = stub.GetApiToken(pb.GetApiTokenRequest(session_token=session_token, api="eps"), metadata=auth)
    expect("api", eps.api, "eps")
    expect("token aal", Aal.Name(eps.aal), "AAL_3")
    expect("access token present", bool(eps.access_token), True)
    channel.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.path.join(REPO, "target", "debug", "session-broker"))
    args = parser.parse_args()
    # Line by line even into a pipe, so progress and a failure's report interleave truthfully.
    sys.stdout.reconfigure(line_buffering=True)
    with tempfile.TemporaryDirectory(prefix="sb-stubs-") as stubs:
        pb, rpc = generate_stubs(stubs)
        broker = Broker(args.broker)
        try:
            journey(pb, rpc, broker)
        except Exception as e:  # any failure: say what, show the broker's log, exit non-zero
            print(f"\nFAILED: {type(e).__name__}: {e}", file=sys.stderr)
            broker.stop()
            broker.dump_log()
            return 1
        finally:
            broker.stop()
    print("\nPython journey: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
