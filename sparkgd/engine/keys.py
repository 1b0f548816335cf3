"""Where a fit's key comes from: what Spark itself protects.

Every connection of a fit (hub to task, task to task) is sealed under keys that come
from the fit's key *and* an X25519 exchange (:mod:`.wire`, :mod:`.peers`): a
recording of the traffic opens nothing, in every setting below. The fit's key is what
proves that a connection is one of the fit's tasks, so it must reach the tasks without
anyone else reading it:

=================================  =====================================================
Spark's setting                    the fit's key
=================================  =====================================================
a ``local`` master                 random, in the tasks' closure (which never leaves
                                   the machine)
RPC encryption                     random, in the tasks' closure, which Spark encrypts
(``spark.network.crypto.enabled``, on its way to the executors
SASL encryption, ``spark.ssl``)
``spark.authenticate`` alone       derived from Spark's own secret (HKDF, salted with a
                                   fresh value of this fit's): the driver reads the
                                   secret from its JVM, the tasks from their executor's
                                   environment (``_SPARK_AUTH_SECRET``: standalone,
                                   Kubernetes); nothing secret travels. Where the tasks
                                   have no secret in their environment (YARN keeps it in
                                   its credentials) they cannot join, and the fit runs
                                   one Spark job per pass (the log says why)
neither                            random, in the closure, which Spark sends in the
                                   clear: anyone who can reach the cluster can run code
                                   in it anyway (Spark asks nobody), and read the key;
                                   said once in the log. A recording still opens no frame
=================================  =====================================================

:func:`choose` decides, where the coordinator starts; :func:`for_task` is what a task
runs on its side.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .seal import derive, new_key

log = logging.getLogger("sparkgd")

#: The environment variable an executor holds Spark's authentication secret in.
SECRET_ENV = "_SPARK_AUTH_SECRET"
#: In a task's error message: it cannot make the fit's key (the fit then falls back).
NO_KEY_MARKER = "sparkgd-no-fit-key"

_SAID = set()


@dataclass(frozen=True)
class FitKey:
    """The hub's copy of the fit's key (``key``), what the tasks' closure carries to
    make theirs (``for_tasks``: the key itself, or ``("spark-secret", salt)``), and
    where it came from, in words (``source``)."""

    key: bytes
    for_tasks: object
    source: str


def _true(get, name):
    return str(get(name) or "false").strip().lower() == "true"


def rpc_encrypted(get):
    """Whether Spark encrypts its RPC (task closures included): AES-based network
    encryption or SASL encryption with authentication, or SSL for RPC."""
    auth = _true(get, "spark.authenticate")
    if auth and (_true(get, "spark.network.crypto.enabled") or
                 _true(get, "spark.authenticate.enableSaslEncryption")):
        return True
    rpc_ssl = get("spark.ssl.rpc.enabled")
    return _true(get, "spark.ssl.rpc.enabled") if rpc_ssl is not None else \
        _true(get, "spark.ssl.enabled")


def choose(get, local, spark_secret=None, hub_in_task=False):
    """The fit's key: ``get(name)`` reads Spark's conf, ``local`` says whether the
    master is local, ``spark_secret()`` returns Spark's authentication secret where the
    caller can read it (the driver's JVM), or None. ``hub_in_task``: the hub runs in a
    task (a Spark Connect fit), which makes its copy as the others do (``key`` None
    when it comes from Spark's secret)."""
    if local:
        key = new_key()
        return FitKey(key, key, "random, in the tasks' closure (a local master: it never "
                                "leaves this machine)")
    if rpc_encrypted(get):
        key = new_key()
        return FitKey(key, key, "random, in the tasks' closure (Spark encrypts it)")
    if _true(get, "spark.authenticate"):
        secret = spark_secret() if spark_secret is not None else None
        if secret or hub_in_task:
            salt = os.urandom(16)
            return FitKey(_from_secret(secret, salt) if secret else None,
                          ("spark-secret", salt),
                          "derived from Spark's authentication secret (nothing secret "
                          "travels)")
    key = new_key()
    if "plain" not in _SAID:
        _SAID.add("plain")
        log.warning("Spark's authentication and RPC encryption are off: anyone who can "
                    "reach this cluster can run code in it, and can read the fit's key "
                    "from its tasks' closures; sparkgd's wire stays sealed against those "
                    "who can only listen (spark.authenticate=true keeps the key off the "
                    "network)")
    return FitKey(key, key, "random, in the tasks' closure (Spark sends it in the clear)")


def _from_secret(secret, salt):
    return derive(secret.encode() if isinstance(secret, str) else bytes(secret), salt,
                  b"fit key from spark's secret")


def for_task(for_tasks):
    """A task's copy of the fit's key, from what its closure carried; RuntimeError
    (marked: the fit falls back) when it cannot be made here."""
    if isinstance(for_tasks, (bytes, bytearray)):
        return bytes(for_tasks)
    kind, salt = for_tasks
    if kind != "spark-secret":
        raise RuntimeError(f"{NO_KEY_MARKER}: a fit key of kind {kind!r}")
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise RuntimeError(f"{NO_KEY_MARKER}: this executor has no Spark authentication "
                           f"secret in its environment ({SECRET_ENV}), to derive the fit's "
                           "key from")
    return _from_secret(secret, salt)


def classic(sc):
    """:func:`choose` for a classic session's driver: Spark's secret as the driver
    was given it (``spark.authenticate.secret``: standalone) or holds it in its
    environment (Kubernetes). Where Spark made the secret itself and keeps it in its
    JVM alone (YARN), the driver cannot read it: the key then rides in the closure, as
    without authentication."""
    from .slots import local_cores

    conf = sc.getConf()

    def spark_secret():
        return conf.get("spark.authenticate.secret", None) or os.environ.get(SECRET_ENV)

    return choose(lambda k: conf.get(k, None), local_cores(sc.master) is not None,
                  spark_secret)
