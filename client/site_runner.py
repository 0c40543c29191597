"""The site runner: site-owned code that starts every ClientApp and decides what its reply may carry.

    fedvlp-site runner --config /etc/fedvlp/site.yaml --runtime-api-address 127.0.0.1:9094
    # started for you by `fedvlp-site supernode`, beside a SuperNode run with --isolation process

With ``--isolation process`` Flower's SuperNode runs no app itself: it queues each message from the
SuperLink as a task on its Runtime API (HTTP on loopback) and waits for a process to claim it. This runner
is that process. It comes from the site's installed fedvlp, never from the FAB it vets, so whoever submits
a run cannot switch it off. For each task, one at a time:

1. claim it (``AcquireTask`` for ``flwr-clientapp`` tasks) and pull its input with Flower's own
   ``pull_task_input``: the run, the context and the FAB (``PullTaskInput``), then the message
   (``PullMessages``, ``PullObject``, ``ConfirmMessageReceived``);
2. hash the FAB's bytes (SHA-256) and check the hash against the site's allowlist
   (:func:`client.approvals.site_policy`, re-read for every task). A refused FAB is never written to disk,
   extracted or imported: the reply is an error naming the FAB and the site's rule;
3. otherwise run the app in a child process (:mod:`client.app_process`) and read back its reply;
4. filter the reply with :func:`client.egress.filter_reply` (the one whitelist, also used inside the
   app); an error reply or a failure of the app becomes a fixed text; record what leaves, and what was
   dropped, in ``privacy.egress_log``;
5. push the reply (``PushMessages``, ``PushObject``, Flower's ``push_message``) and end the task
   (``PushTaskOutput``), heart-beating it meanwhile (``SendTaskHeartbeat``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from .approvals import site_policy
from .egress import SITE_RUNNER_ENV, audit, failure, filter_reply
from .site_config import SiteConfig, load_site_config

log = logging.getLogger(__name__)

COMPONENT = "fedvlp-site-runner"
APP_FAILED = "the app failed at this site; the site's log has the details"
APP_ERROR = "the app at this site replied with an error; the site's log has its reason"
NO_DECISION = "the site could not decide whether to run this app; the site's log has the details"


class SiteRunner:
    """Claims the SuperNode's ClientApp tasks and runs them under the site's policy.

    Args:
        site_config: the site YAML (its ``privacy`` section is the policy; re-read for every task).
        runtime_api_address: the SuperNode's Runtime API, ``127.0.0.1:PORT`` (its ``--port``).
        poll_s: seconds between looks for a new task.
    """

    def __init__(self, site_config: str | Path, runtime_api_address: str, poll_s: float = 1.0) -> None:
        self.site_config = str(site_config)
        self.address = runtime_api_address
        self.poll_s = poll_s
        self.stopping = threading.Event()
        self._task_lost = threading.Event()
        self._child: subprocess.Popen | None = None

    def _client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        # a task's calls ride out a SuperNode that is briefly busy; the task poll retries on its own
        retry = RetryInvoker(lambda: exponential(max_delay=10), (httpx.TransportError,), max_tries=None, max_time=120,
                             should_giveup=lambda _: self.stopping.is_set(), wait_function=self.stopping.wait
                             ) if token else None
        return RuntimeHttpClient.from_server_address(self.address, insecure=True, root_certificates=None,
                                                     interceptors=interceptors, retry_invoker=retry)

    def serve(self) -> None:
        """Claim and run tasks until :meth:`stop`."""
        client = self._client()
        reachable = None
        log.info("site runner: taking the ClientApp tasks of the SuperNode at %s under %s", self.address,
                 self.site_config)
        try:
            while not self.stopping.is_set():
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.HTTPError as err:
                    if reachable is not False:
                        log.warning("the SuperNode's Runtime API at %s does not answer (%s); waiting for it",
                                    self.address, type(err).__name__)
                    reachable = False
                    self.stopping.wait(self.poll_s)
                    continue
                reachable = True
                if res.HasField("task") and res.token:
                    self.run_task(res.token, res.task.task_id)
                else:
                    self.stopping.wait(self.poll_s)
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()

    def _heartbeat(self, client: RuntimeHttpClient):
        def beat() -> bool:
            try:
                res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.TransportError:
                return False
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (503, 504):
                    return False
                res = None
            if res is None or not res.success:  # the SuperNode no longer counts this task as running
                self._task_lost.set()
            return True
        return beat

    def run_task(self, token: str, task_id: int) -> None:
        client = self._client(token)
        self._task_lost.clear()
        heartbeat = HeartbeatSender(self._heartbeat(client))
        heartbeat.start()
        context, sub_status = None, SubStatus.FAILED
        try:
            message, context, run, fab = pull_task_input(client)
            try:
                reply, context = self.decide(task_id, message, context, run, fab)
            except Exception:  # noqa: BLE001 - e.g. a site YAML broken meanwhile: answer, never with the reason
                log.exception("site runner: no decision for task %d; the server is told so without details", task_id)
                reply = failure(message, NO_DECISION)
            push_message(client, reply, context)
            sub_status = SubStatus.COMPLETED if not reply.has_error() else SubStatus.FAILED
        except Exception:  # noqa: BLE001 - one broken task must not stop the site
            log.exception("site runner: task %d failed; nothing but an error left the site", task_id)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status,
                             details="" if sub_status == SubStatus.COMPLETED else "see the site runner's log")
            heartbeat.stop()
            client.close()

    def decide(self, task_id: int, message: Message, context: Context, run, fab) -> tuple[Message, Context]:
        """The reply that may leave for ``message`` (and the context to keep), under the site's policy."""
        cfg = load_site_config(self.site_config, require_data=False)
        fab_hash = hashlib.sha256(fab.content).hexdigest()
        policy = site_policy(cfg)
        dropped: list[str] = []
        if not policy.allows(fab_hash):
            reason = policy.refusal(fab_hash)
            log.error("site runner: %s; the FAB was not extracted", reason)
            reply = failure(message, reason, ErrorCode.LOAD_CLIENT_APP_EXCEPTION)
        elif fab_hash != run.fab_hash:
            log.error("site runner: the FAB's content hashes to %s, the run names %s: refused", fab_hash, run.fab_hash)
            reply = failure(message, f"this site refuses to run FAB {run.fab_hash}: its content does not match its hash",
                            ErrorCode.LOAD_CLIENT_APP_EXCEPTION)
        else:
            log.info("site runner: FAB %s is allowed (%s); starting the app for message %s", fab_hash,
                     "any app" if policy.any_app else "allowlist", message.metadata.message_id[:12])
            raw, context_out = self.run_app(cfg, task_id, run, fab_hash, fab.content, message, context)
            if raw is None:
                reply = failure(message, APP_FAILED)
            elif raw.has_error():
                log.error("site runner: the app replied with an error (code %s): %s", raw.error.code, raw.error.reason)
                reply = failure(message, APP_ERROR)
            else:
                reply, dropped = filter_reply(message, raw, cfg.privacy.max_num_examples)
                for item in dropped:
                    log.warning("site runner: dropped %s from the reply", item)
            if context_out is not None:  # the app's own state, kept at the SuperNode; node config stays the site's
                context = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                                  state=context_out.state, run_config=context.run_config)
        if cfg.privacy.egress_log:
            audit(cfg.privacy.egress_log, message, reply, dropped, fab_hash=fab_hash, site_runner=True)
        return reply, context

    def run_app(self, cfg: SiteConfig, task_id: int, run, fab_hash: str, content: bytes, message: Message,
                context: Context) -> tuple[Message | None, Context | None]:
        """The app's own reply and context, from a child process in a folder of this task (then removed)."""
        task_dir = Path(cfg.cache_dir) / "site_runner" / f"task-{task_id}"
        shutil.rmtree(task_dir, ignore_errors=True)
        task_dir.mkdir(parents=True)
        try:
            (task_dir / "app.fab").write_bytes(content)
            request = message_to_proto(message).SerializeToString()
            (task_dir / "message.pb").write_bytes(request)
            (task_dir / "context.pb").write_bytes(context_to_proto(context).SerializeToString())
            (task_dir / "task.json").write_text(json.dumps({
                "task_id": task_id, "run_id": context.run_id, "node_id": context.node_id, "fab_id": run.fab_id,
                "fab_version": run.fab_version, "fab_hash": fab_hash}))
            env = {**os.environ, "FLWR_HOME": str(task_dir / "flwr_home"), SITE_RUNNER_ENV: "1"}
            started = time.time()
            self._child = subprocess.Popen([sys.executable, "-m", "client.app_process", str(task_dir)],
                                           cwd=task_dir, env=env)
            while self._child.poll() is None:
                if self.stopping.is_set() or self._task_lost.is_set():
                    log.error("site runner: %s; stopping the app", "stopping" if self.stopping.is_set()
                              else "the SuperNode dropped the task")
                    self._child.terminate()
                    try:
                        self._child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        self._child.kill()
                    break
                self.stopping.wait(0.5)
            rc = self._child.wait()
            log.info("site runner: the app process ended with status %s after %.1f s", rc, time.time() - started)
            reply_file = task_dir / "reply.pb"
            if rc != 0 or not reply_file.is_file():
                log.error("site runner: the app process exited with status %s without a reply", rc)
                return None, None
            if reply_file.stat().st_size > 2 * len(request) + (1 << 20):  # more than a model's worth: not a reply
                log.error("site runner: the app's reply is %d bytes for a %d-byte message: refused",
                          reply_file.stat().st_size, len(request))
                return None, None
            reply = message_from_proto(ProtoMessage.FromString(reply_file.read_bytes()))
            out = task_dir / "context_out.pb"
            context_out = context_from_proto(ProtoContext.FromString(out.read_bytes())) if out.is_file() else None
            return reply, context_out
        finally:
            self._child = None
            shutil.rmtree(task_dir, ignore_errors=True)
