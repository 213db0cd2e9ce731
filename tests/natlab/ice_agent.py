"""One ICE agent of the NAT lab: aioice (PyPI) inside a site's host namespace.

Gathers host, server-reflexive (STUN) and relayed (TURN) candidates from turnpike, prints them
as one JSON line on stdout, reads the other agent's candidates and credentials as one JSON line
on stdin (the orchestrator, natlab.py, carries them on the host: signalling never crosses the
lab network), runs ICE, then exchanges data over the selected pair and prints a JSON result.

The controlling agent sends COUNT numbered messages and expects every one echoed back; the
controlled agent echoes until it gets "bye".

Nomination: aioice's controlling agent nominates aggressively (USE-CANDIDATE on every check),
so the first pair whose check succeeds wins, which is usually a relayed pair because a hole
punched through a port-restricted NAT only opens on the first retransmission (500 ms). Browsers
nominate regularly (RFC 8445 section 8.1.1): checks run without USE-CANDIDATE, and the
controlling agent nominates the best valid pair. This agent does the same with a fixed
stopping criterion: SETTLE seconds after the checks start, it nominates the highest-priority
pair that succeeded (then the next, if that nomination fails). Everything else, pairing,
pacing, retransmission, triggered checks, peer-reflexive candidates, is aioice's own.

usage: ice_agent.py controlling|controlled STUN_TURN_HOST PORT USER PASSWORD [COUNT] [SETTLE]
"""

import asyncio
import json
import sys
import time

import aioice
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, candidate_pair_priority

ICE_COMPLETED = 1
ICE_FAILED = 2
NOMINATION_DEADLINE = 15.0  # seconds after the checks start without any valid pair: fail


class RegularNomination(aioice.Connection):
    """aioice's Connection with regular instead of aggressive nomination when controlling."""

    def __init__(self, *args, settle: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._settle = settle
        self._deciding = self.ice_controlling
        self.nomination_log = []
        if self.ice_controlling:
            # check_start() adds USE-CANDIDATE to ordinary checks unless the peer is "lite",
            # and nominates the first success unless a nomination is under way for the
            # component: claim both, so that only _nominate_best() nominates.
            self.remote_is_lite = True
            self._nominating.update(self._components)

    def _check_list_maybe_fail(self):
        # aioice fails a controlling agent's check list once every pair is done and none is
        # nominated; here nomination is ours to decide.
        if self._deciding:
            return
        super()._check_list_maybe_fail()

    async def connect(self):
        task = asyncio.create_task(self._nominate_best()) if self.ice_controlling else None
        try:
            await super().connect()
        finally:
            if task is not None:
                task.cancel()

    async def _nominate_best(self):
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(self._settle)
        tried = set()
        while loop.time() - start < NOMINATION_DEADLINE:
            valid = [
                p
                for p in self._check_list
                if p.state == CandidatePair.State.SUCCEEDED and id(p) not in tried
            ]
            if not valid:
                await asyncio.sleep(0.05)
                continue
            best = max(
                valid,
                key=lambda p: candidate_pair_priority(p.local_candidate, p.remote_candidate, True),
            )
            tried.add(id(best))
            request = self.build_request(best, nominate=True)
            try:
                await best.protocol.request(
                    request, best.remote_addr, integrity_key=self.remote_password.encode("utf8")
                )
            except Exception as exc:  # TransactionError, or a TURN send failure
                self.nomination_log.append(f"nomination of {best} failed: {exc!r}")
                continue
            self.nomination_log.append(
                f"nominated {best} after {loop.time() - start:.2f}s "
                f"({len(valid)} valid pairs: {[describe_pair(p) for p in valid]})"
            )
            self._deciding = False
            best.nominated = True
            self.check_complete(best)
            return
        self._deciding = False
        if not self._check_list_done:
            self._check_list_state.put_nowait(ICE_FAILED)
            self._check_list_done = True


def describe_candidate(c: Candidate) -> dict:
    return {"type": c.type, "addr": f"{c.host}:{c.port}"}


def describe_pair(p: CandidatePair) -> str:
    return (
        f"{p.local_candidate.type} {p.local_candidate.host}:{p.local_candidate.port} -> "
        f"{p.remote_candidate.type} {p.remote_candidate.host}:{p.remote_candidate.port}"
    )


async def read_line(reader: asyncio.StreamReader, timeout: float) -> dict:
    line = await asyncio.wait_for(reader.readline(), timeout)
    if not line:
        raise RuntimeError("signalling closed")
    return json.loads(line)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> int:
    role, host, port, user, password = sys.argv[1:6]
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 100
    settle = float(sys.argv[7]) if len(sys.argv) > 7 else 2.5
    controlling = role == "controlling"
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    conn = RegularNomination(
        ice_controlling=controlling,
        stun_server=(host, int(port)),
        turn_server=(host, int(port)),
        turn_username=user,
        turn_password=password,
        use_ipv4=True,
        use_ipv6=False,
        settle=settle,
    )
    result = {"role": role}
    try:
        t0 = time.monotonic()
        await conn.gather_candidates()
        result["gather_ms"] = round((time.monotonic() - t0) * 1000)
        result["local_candidates"] = [describe_candidate(c) for c in conn.local_candidates]
        emit(
            {
                "candidates": [c.to_sdp() for c in conn.local_candidates],
                "ufrag": conn.local_username,
                "pwd": conn.local_password,
            }
        )

        remote = await read_line(reader, 20)
        conn.remote_username = remote["ufrag"]
        conn.remote_password = remote["pwd"]
        for sdp in remote["candidates"]:
            await conn.add_remote_candidate(Candidate.from_sdp(sdp))
        await conn.add_remote_candidate(None)

        t0 = time.monotonic()
        await asyncio.wait_for(conn.connect(), NOMINATION_DEADLINE + 5)
        result["connect_ms"] = round((time.monotonic() - t0) * 1000)
        pair = conn._nominated[1]
        result["selected"] = {
            "local": describe_candidate(pair.local_candidate),
            "remote": describe_candidate(pair.remote_candidate),
        }
        result["nomination"] = conn.nomination_log

        if controlling:
            result["sent"] = count
            got = set()
            for i in range(count):
                await conn.send(b"natlab-%05d" % i)
                await asyncio.sleep(0.001)
            deadline = loop.time() + 5
            while len(got) < count and loop.time() < deadline:
                try:
                    data = await asyncio.wait_for(conn.recv(), max(0.01, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if data.startswith(b"natlab-"):
                    got.add(data)
            result["received"] = len(got)
            for _ in range(3):
                await conn.send(b"bye")
                await asyncio.sleep(0.02)
        else:
            echoed = 0
            deadline = loop.time() + 15
            while loop.time() < deadline:
                try:
                    data = await asyncio.wait_for(conn.recv(), max(0.01, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if data == b"bye":
                    break
                await conn.send(data)
                echoed += 1
            result["echoed"] = echoed
    except Exception as exc:
        result["error"] = repr(exc)
        result["checks"] = [f"{describe_pair(p)} {p.state.name}" for p in conn._check_list]
        result["nomination"] = getattr(conn, "nomination_log", [])
    finally:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:
            pass
    emit({"result": result})
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
