"""Where circuit breakers and retry budgets keep their state: Redis, shared by the fleet.

Each operation is one Lua script, so every worker sees and changes a breaker (or a budget)
atomically, and the windows slide on the Redis server's clock (``TIME``), not on each worker's.
The same algorithm is written once more in Python for :class:`LocalStore`, the per-process
state of a worker that has no Redis to share (no Redis broker, no ``resilient_tasks_state_url``);
a unit test runs both on the same sequences of calls and compares them.

The store failing must not stop work: :class:`FleetState` turns any error of Redis into
``None`` (the caller then lets the task run, or the retry happen, as without protection), says
so once per worker with a warning and a ``state_store_unavailable`` event (each of its other
processes at info level), tries again after :data:`RETRY_AFTER` seconds, and says when it
answers again.

Windows are :data:`BUCKETS` buckets of ``window / BUCKETS`` seconds each: a count leaves the
window up to one bucket (5 % of the window) late.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from . import _events

if TYPE_CHECKING:
    from celery import Celery

    from .breaker import CircuitBreaker
    from .budget import RetryBudget

__all__ = [
    "BUCKETS",
    "RETRY_AFTER",
    "BreakerReply",
    "BudgetReply",
    "FleetState",
    "LocalStore",
    "RedisStore",
    "state_for",
]

logger = logging.getLogger(__name__)

#: Buckets per window.
BUCKETS = 20
#: After the store failed, how long operations skip it (failing open) before trying again.
RETRY_AFTER = 5.0
#: Redis keys: ``resilient_tasks:breaker:<name>``, ``resilient_tasks:budget:<key>``.
KEY_PREFIX = "resilient_tasks"
#: Socket timeouts for the store: a store that does not answer quickly is a store that is down.
SOCKET_TIMEOUT = 0.5

Action = Literal["run", "probe", "defer"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class BreakerReply:
    """A breaker's state after one operation, and what the operation decided.

    ``action`` (an admission): run the task, run it as a half-open probe, or defer it by
    ``wait`` seconds. ``state`` is ``closed``, ``open`` or ``half_open``; ``remaining`` the
    seconds an open breaker stays open; ``transition`` the state this operation moved the
    breaker to (``opened``, ``half_open``, ``closed``) or ``""``; ``calls`` and ``failures``
    are the closed window's counts."""

    action: Action
    wait: float
    state: str
    remaining: float
    transition: str
    calls: int
    failures: int


@dataclass(frozen=True)
class BudgetReply:
    """A retry budget after one operation: whether the retry asked for is granted, and the
    window's first attempts, retries and the retries it allows."""

    granted: bool
    attempts: int
    retries: int
    allowed: float


# -- the algorithm, in Lua (Redis) ----------------------------------------------------------------

_COMMON = """
-- Redis < 5 refuses writes after TIME without this
if redis.replicate_commands then pcall(redis.replicate_commands) end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local BUCKETS = 20
"""

# KEYS[1]: the breaker's hash. ARGV: now_ms ('' = Redis' clock), op ('admit' or 'report'),
# window_ms, failure_threshold, minimum_calls, reset_ms, probes, successes, failures,
# probe outcome ('ok', 'fail', 'release' or '').
_BREAKER_LUA = (
    _COMMON
    + """
local key = KEYS[1]
local op = ARGV[2]
local window = tonumber(ARGV[3])
local threshold = tonumber(ARGV[4])
local minimum = tonumber(ARGV[5])
local reset = tonumber(ARGV[6])
local max_probes = tonumber(ARGV[7])
local successes = tonumber(ARGV[8])
local failures = tonumber(ARGV[9])
local probe = ARGV[10]
local width = math.max(1, math.floor(window / BUCKETS))
local current = math.floor(now / width)

local raw = redis.call('HGETALL', key)
local h = {}
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local state = h['state'] or 'closed'
local opened_until = tonumber(h['until'] or '0')
local probes = tonumber(h['probes'] or '0')
local lease = tonumber(h['lease'] or '0')
local transition = ''
local calls, failed = 0, 0
local buckets = {}
for field, value in pairs(h) do
  local kind, index = string.match(field, '^([sf]):(%d+)$')
  if kind then
    if tonumber(index) <= current - BUCKETS then
      redis.call('HDEL', key, field)
    else
      buckets[#buckets + 1] = field
      calls = calls + tonumber(value)
      if kind == 'f' then failed = failed + tonumber(value) end
    end
  end
end

local function clear()  -- the window's counts stay in the reply: what the change saw
  for _, field in ipairs(buckets) do redis.call('HDEL', key, field) end
  buckets = {}
end
local function open()
  state = 'open'
  opened_until = now + reset
  probes = 0
  lease = 0
  transition = 'opened'
  clear()
end

if state == 'half_open' then
  if probe == 'ok' then
    state = 'closed'
    probes = 0
    lease = 0
    transition = 'closed'
    clear()
    calls, failed = 0, 0
  elseif probe == 'fail' then
    open()
  elseif probe == 'release' then
    probes = math.max(0, probes - 1)
  end
end
if state == 'closed' and (successes > 0 or failures > 0) then
  if successes > 0 then redis.call('HINCRBY', key, 's:' .. current, successes) end
  if failures > 0 then redis.call('HINCRBY', key, 'f:' .. current, failures) end
  buckets[#buckets + 1] = 's:' .. current
  buckets[#buckets + 1] = 'f:' .. current
  calls = calls + successes + failures
  failed = failed + failures
  if failures > 0 and calls >= minimum and failed >= threshold * calls then open() end
end

local action, wait = 'run', 0
if op == 'admit' then
  if state == 'open' then
    if now < opened_until then
      action = 'defer'
      wait = opened_until - now
    else
      state = 'half_open'
      probes = 0
      lease = 0
      transition = 'half_open'
    end
  end
  if state == 'half_open' then
    if lease > 0 and now >= lease then probes = 0 end
    if probes < max_probes then
      probes = probes + 1
      lease = now + reset
      action = 'probe'
    else
      action = 'defer'
      wait = math.min(lease - now, math.max(1000, math.floor(reset / 4)))
    end
  end
end

redis.call('HSET', key, 'state', state, 'until', opened_until, 'probes', probes, 'lease', lease)
redis.call('PEXPIRE', key, 2 * (window + reset) + 60000)
local remaining = 0
if state == 'open' then remaining = math.max(0, opened_until - now) end
return {action, wait, state, remaining, transition, calls, failed}
"""
)

# KEYS[1]: the budget's hash. ARGV: now_ms ('' = Redis' clock), window_ms, ratio,
# min_retries_per_second, first attempts to add, 1 to ask for a retry (else 0).
_BUDGET_LUA = (
    _COMMON
    + """
local key = KEYS[1]
local window = tonumber(ARGV[2])
local ratio = tonumber(ARGV[3])
local per_second = tonumber(ARGV[4])
local deposits = tonumber(ARGV[5])
local spend = tonumber(ARGV[6])
local width = math.max(1, math.floor(window / BUCKETS))
local current = math.floor(now / width)

local raw = redis.call('HGETALL', key)
local attempts, retries = 0, 0
for i = 1, #raw, 2 do
  local kind, index = string.match(raw[i], '^([ar]):(%d+)$')
  if kind then
    if tonumber(index) <= current - BUCKETS then
      redis.call('HDEL', key, raw[i])
    elseif kind == 'a' then
      attempts = attempts + tonumber(raw[i + 1])
    else
      retries = retries + tonumber(raw[i + 1])
    end
  end
end
if deposits > 0 then
  redis.call('HINCRBY', key, 'a:' .. current, deposits)
  attempts = attempts + deposits
end
local allowed = ratio * attempts + per_second * window / 1000
local granted = 0
if spend == 1 and retries + 1 <= allowed then
  redis.call('HINCRBY', key, 'r:' .. current, 1)
  retries = retries + 1
  granted = 1
end
redis.call('PEXPIRE', key, 2 * window + 60000)
return {granted, attempts, retries, tostring(allowed)}
"""
)


def breaker_key(name: str) -> str:
    return f"{KEY_PREFIX}:breaker:{name}"


def budget_key(key: str) -> str:
    return f"{KEY_PREFIX}:budget:{key}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _breaker_args(
    spec: CircuitBreaker, op: str, successes: int, failures: int, probe: str
) -> list[Any]:
    return [
        op,
        _ms(spec.window),
        spec.failure_threshold,
        spec.minimum_calls,
        _ms(spec.reset_timeout),
        spec.half_open_probes,
        successes,
        failures,
        probe,
    ]


def _breaker_reply(raw: list[Any]) -> BreakerReply:
    action, wait, state, remaining, transition, calls, failed = (
        v.decode() if isinstance(v, bytes) else v for v in raw
    )
    return BreakerReply(
        action=cast(Action, action),
        wait=int(wait) / 1000,
        state=state,
        remaining=int(remaining) / 1000,
        transition=transition,
        calls=int(calls),
        failures=int(failed),
    )


class RedisStore:
    """The shared store: one Lua script per operation, on the Redis at ``url``."""

    shared = True

    def __init__(self, url: str) -> None:
        import redis  # an optional dependency: resilient-tasks[redis], or celery[redis]

        self.url = url
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry_on_timeout=False,
        )
        self._breaker = self.client.register_script(_BREAKER_LUA)
        self._budget = self.client.register_script(_BUDGET_LUA)

    def breaker(
        self,
        spec: CircuitBreaker,
        op: str,
        successes: int = 0,
        failures: int = 0,
        probe: str = "",
        now: float | None = None,
    ) -> BreakerReply:
        """Report outcomes to the breaker ``spec`` names and, with ``op="admit"``, ask whether
        a task may run. ``now`` (seconds) replaces Redis' clock, for tests."""
        args = [
            "" if now is None else _ms(now),
            *_breaker_args(spec, op, successes, failures, probe),
        ]
        return _breaker_reply(self._breaker(keys=[breaker_key(spec.name)], args=args))

    def budget(
        self, spec: RetryBudget, key: str, deposits: int, spend: bool, now: float | None = None
    ) -> BudgetReply:
        """Add ``deposits`` first attempts to the budget ``key`` and, with ``spend``, ask for
        one retry."""
        args = [
            "" if now is None else _ms(now),
            _ms(spec.window),
            spec.ratio,
            spec.min_retries_per_second,
            deposits,
            1 if spend else 0,
        ]
        granted, attempts, retries, allowed = self._budget(keys=[budget_key(key)], args=args)
        return BudgetReply(bool(granted), int(attempts), int(retries), float(allowed))

    def forget(self, *, breakers: tuple[str, ...] = (), budgets: tuple[str, ...] = ()) -> None:
        """Delete the state of these breakers and budgets (tests clean up with it)."""
        keys = [breaker_key(n) for n in breakers] + [budget_key(k) for k in budgets]
        if keys:
            self.client.delete(*keys)


# -- the same algorithm in Python: per-process state --------------------------------------------


class LocalStore:
    """:class:`RedisStore`'s algorithm on this process's memory, on ``clock`` (seconds)."""

    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._hashes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def breaker(
        self,
        spec: CircuitBreaker,
        op: str,
        successes: int = 0,
        failures: int = 0,
        probe: str = "",
        now: float | None = None,
    ) -> BreakerReply:
        with self._lock:
            return self._breaker(spec, op, successes, failures, probe, now)

    def _breaker(
        self,
        spec: CircuitBreaker,
        op: str,
        successes: int,
        failures: int,
        probe: str,
        now_s: float | None,
    ) -> BreakerReply:
        now = _ms(self.clock() if now_s is None else now_s)
        window, reset = _ms(spec.window), _ms(spec.reset_timeout)
        width = max(1, window // BUCKETS)
        current = now // width
        h = self._hashes.setdefault(breaker_key(spec.name), {})
        state = h.get("state", "closed")
        until, probes, lease = h.get("until", 0), h.get("probes", 0), h.get("lease", 0)
        transition = ""
        buckets: dict[tuple[str, int], int] = h.setdefault("buckets", {})
        for slot in [s for s in buckets if s[1] <= current - BUCKETS]:
            del buckets[slot]
        calls = sum(buckets.values())
        failed = sum(v for (kind, _), v in buckets.items() if kind == "f")

        def open_() -> tuple[str, int, int, int, str]:
            buckets.clear()
            return "open", now + reset, 0, 0, "opened"

        if state == "half_open":
            if probe == "ok":
                state, probes, lease, transition = "closed", 0, 0, "closed"
                buckets.clear()
                calls = failed = 0
            elif probe == "fail":
                state, until, probes, lease, transition = open_()
            elif probe == "release":
                probes = max(0, probes - 1)
        if state == "closed" and (successes > 0 or failures > 0):
            if successes > 0:
                buckets[("s", current)] = buckets.get(("s", current), 0) + successes
            if failures > 0:
                buckets[("f", current)] = buckets.get(("f", current), 0) + failures
            calls += successes + failures
            failed += failures
            if (
                failures > 0
                and calls >= spec.minimum_calls
                and failed >= (spec.failure_threshold * calls)
            ):
                state, until, probes, lease, transition = open_()

        action: Action = "run"
        wait = 0
        if op == "admit":
            if state == "open":
                if now < until:
                    action, wait = "defer", until - now
                else:
                    state, probes, lease, transition = "half_open", 0, 0, "half_open"
            if state == "half_open":
                if lease > 0 and now >= lease:
                    probes = 0
                if probes < spec.half_open_probes:
                    probes, lease, action = probes + 1, now + reset, "probe"
                else:
                    action = "defer"
                    wait = min(lease - now, max(1000, reset // 4))
        h.update(state=state, until=until, probes=probes, lease=lease)
        remaining = max(0, until - now) if state == "open" else 0
        return BreakerReply(action, wait / 1000, state, remaining / 1000, transition, calls, failed)

    def budget(
        self, spec: RetryBudget, key: str, deposits: int, spend: bool, now: float | None = None
    ) -> BudgetReply:
        with self._lock:
            now_ms = _ms(self.clock() if now is None else now)
            window = _ms(spec.window)
            current = now_ms // max(1, window // BUCKETS)
            buckets: dict[Any, Any] = self._hashes.setdefault(budget_key(key), {})
            for slot in [s for s in buckets if s[1] <= current - BUCKETS]:
                del buckets[slot]
            attempts = sum(v for (kind, _), v in buckets.items() if kind == "a")
            retries = sum(v for (kind, _), v in buckets.items() if kind == "r")
            if deposits > 0:
                buckets[("a", current)] = buckets.get(("a", current), 0) + deposits
                attempts += deposits
            allowed = spec.ratio * attempts + spec.min_retries_per_second * window / 1000
            granted = spend and retries + 1 <= allowed
            if granted:
                buckets[("r", current)] = buckets.get(("r", current), 0) + 1
                retries += 1
            return BudgetReply(granted, attempts, retries, allowed)

    def forget(self, *, breakers: tuple[str, ...] = (), budgets: tuple[str, ...] = ()) -> None:
        with self._lock:
            for key in [breaker_key(n) for n in breakers] + [budget_key(k) for k in budgets]:
                self._hashes.pop(key, None)


Store = RedisStore | LocalStore


class FleetState:
    """A store that fails open: an operation that cannot reach it returns ``None``.

    ``where`` names the store for the log (its URL without a password, or "this process").
    """

    def __init__(self, store: Store, where: str) -> None:
        self.store = store
        self.where = where
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        return self.store.shared

    def breaker(self, spec: CircuitBreaker, op: str, **counts: Any) -> BreakerReply | None:
        return self._call(lambda: self.store.breaker(spec, op, **counts))

    def budget(self, spec: RetryBudget, key: str, deposits: int, spend: bool) -> BudgetReply | None:
        return self._call(lambda: self.store.budget(spec, key, deposits, spend))

    def _call(self, operation: Callable[[], _T]) -> _T | None:
        if self._down and time.monotonic() < self._down_until:
            return None
        try:
            result = operation()
        except Exception as exc:
            with self._lock:
                self._down_until = time.monotonic() + RETRY_AFTER
                first = not self._down
                self._down = True
            if first:
                said = _say_for_the_worker(down=True)
                logger.log(
                    logging.WARNING if said else logging.INFO,
                    "resilient_tasks: the state store %s does not answer (%s: %s); circuit "
                    "breakers and retry budgets are off (tasks run and retry as without them) "
                    "until it answers again",
                    self.where,
                    type(exc).__name__,
                    exc,
                )
                if said:
                    _events.emit("state_store_unavailable", store=self.where, exception=exc)
            return None
        if self._down:
            with self._lock:
                self._down = False
            said = _say_for_the_worker(down=False)
            logger.log(
                logging.WARNING if said else logging.INFO,
                "resilient_tasks: the state store %s answers again; circuit breakers and retry "
                "budgets are back on",
                self.where,
            )
            if said:
                _events.emit("state_store_available", store=self.where)
        return result


# One byte of memory shared by a worker's main process and the pool processes it forks (they
# inherit the mapping): whether one of them has said the store is down, so that a worker says
# it once (at warning level, with an event), not once per process.
_worker_flag = mmap.mmap(-1, 1)


def _say_for_the_worker(*, down: bool) -> bool:
    """Whether this process is the one of its worker to say that the store went ``down`` (or
    came back): the first to see the change. Each process still notes it at info level."""
    wanted = b"\x01" if down else b"\x00"
    if _worker_flag[0:1] == wanted:
        return False
    _worker_flag[0:1] = wanted
    return True


_states: weakref.WeakKeyDictionary[Celery, FleetState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_url(app: Celery) -> str | None:
    """Where ``app``'s breakers and budgets keep their state: the app setting
    ``resilient_tasks_state_url``, else the broker's URL when the broker is Redis, else
    ``None`` (per process)."""
    configured = app.conf.get("resilient_tasks_state_url")
    if configured:
        return str(configured)
    connection = app.connection_for_write()
    try:
        if connection.transport.driver_type == "redis":
            url = str(connection.as_uri(include_password=True))
            # Kombu's Sentinel transport is "redis" too, but its URL is not one redis-py reads.
            if url.split(":", 1)[0] in _REDIS_SCHEMES:
                return url
    finally:
        connection.release()
    return None


_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


def state_for(app: Celery) -> FleetState:
    """``app``'s store in this process (made on first use)."""
    state = _states.get(app)
    if state is not None:
        return state
    with _states_lock:
        state = _states.get(app)
        if state is None:
            url = state_url(app)
            state = FleetState(LocalStore(), "this process")
            if url is not None:
                try:
                    state = FleetState(RedisStore(url), _without_password(url))
                except Exception as exc:  # no redis package, a URL it cannot read
                    logger.warning(
                        "resilient_tasks: cannot use %s as the state store of circuit breakers "
                        "and retry budgets (%s: %s); their state stays in each process",
                        _without_password(url),
                        type(exc).__name__,
                        exc,
                    )
            _states[app] = state
    return state


def _without_password(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
