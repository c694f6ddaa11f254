// The client's retries and errors, against a scripted fetch: a real gateway cannot be made
// to answer 503 or 504 on cue.
import assert from "node:assert/strict";
import { test } from "node:test";
import { FeedloopClient, FeedloopError } from "../src/index.js";
import { delayMs, retryAfterMs } from "../src/retry.js";

const ACCEPTED = { accepted: 1, rejected: 0, errors: [] };

/** A fetch that answers from a script and records each request's body. */
function scripted(...answers: (Response | Error)[]) {
  const bodies: string[] = [];
  const fetch = async (_url: string | URL | Request, init?: RequestInit): Promise<Response> => {
    bodies.push(String(init?.body));
    const next = answers.shift();
    if (next === undefined) throw new Error("more requests than scripted");
    if (next instanceof Error) throw next;
    return next;
  };
  return { fetch: fetch as typeof globalThis.fetch, bodies };
}

const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });

function client(fetch: typeof globalThis.fetch) {
  return new FeedloopClient({ baseUrl: "http://gateway.test", apiKey: "k", appId: "app", fetch,
                              retry: { retries: 3, baseDelayMs: 1 } });
}

test("a 503 and a network error are retried with the same event ids", async () => {
  const { fetch, bodies } = scripted(json(503, { reason: "broker_unavailable", detail: "down" }),
                                     new TypeError("fetch failed"), json(202, ACCEPTED));
  const feedloop = client(fetch);
  const result = await feedloop.sendEvents([feedloop.thumbs("i-1", true)]);
  assert.deepEqual(result, ACCEPTED);
  assert.equal(bodies.length, 3);
  assert.equal(new Set(bodies).size, 1, "every try sends the same events");
});

test("a 429's Retry-After is waited out", async () => {
  const { fetch } = scripted(json(429, { reason: "rate_limited", detail: "slow down" }, { "Retry-After": "1" }),
                             json(202, ACCEPTED));
  const started = Date.now();
  await client(fetch).sendEvents([]);
  assert.ok(Date.now() - started >= 1000, "retried before Retry-After");
});

test("a Retry-After longer than the longest backoff fails at once", async () => {
  const { fetch, bodies } = scripted(json(429, { reason: "rate_limited", detail: "slow down" }, { "Retry-After": "3600" }));
  await assert.rejects(client(fetch).sendEvents([]), { name: "FeedloopError", status: 429, reason: "rate_limited" });
  assert.equal(bodies.length, 1);
});

test("other 4xx throw the gateway's reason and detail without a retry", async () => {
  const { fetch, bodies } = scripted(json(422, { reason: "too_many_events", detail: "at most 1000" }));
  const error = await client(fetch).sendEvents([]).catch((e: unknown) => e);
  assert.ok(error instanceof FeedloopError);
  assert.deepEqual([error.status, error.reason, error.detail], [422, "too_many_events", "at most 1000"]);
  assert.equal(bodies.length, 1);
});

test("when retries run out the last answer is the error, whatever its body", async () => {
  const { fetch, bodies } = scripted(...Array.from({ length: 4 }, () => new Response("<html>bad gateway</html>", { status: 502 })));
  await assert.rejects(client(fetch).sendEvents([]), { status: 502, reason: "error", detail: "<html>bad gateway</html>" });
  assert.equal(bodies.length, 4);
});

test("events get their id and time when they are built", () => {
  const feedloop = client(scripted().fetch);
  const before = new Date().toISOString();
  const turn = feedloop.interaction({ user_id: "u", session_id: "s", adapter: "base", response: "hello",
                                      prompt: [{ role: "user", content: "hi" }] });
  const thumb = feedloop.thumbs(turn, false, { comment: "too short" });
  assert.match(turn.event_id, /^[0-9a-f-]{36}$/);
  assert.notEqual(turn.event_id, thumb.event_id);
  assert.ok(turn.occurred_at >= before && turn.occurred_at.endsWith("Z"));
  assert.deepEqual([thumb.interaction_id, thumb.session_id, thumb.value, thumb.kind, thumb.app_id],
                   [turn.interaction_id, "s", -1, "thumbs", "app"]);
});

test("Retry-After reads seconds and HTTP dates", () => {
  assert.equal(retryAfterMs("2"), 2000);
  assert.equal(retryAfterMs(new Date(10_000).toUTCString(), 4_000), 6000);
  assert.equal(retryAfterMs(null), undefined);
  assert.equal(retryAfterMs("soon"), undefined);
  const policy = { retries: 4, baseDelayMs: 100, maxDelayMs: 1000 };
  assert.equal(delayMs(10, policy, undefined, () => 1), 1000, "backoff is capped");
  assert.equal(delayMs(0, policy, 500, () => 0.5), 550, "Retry-After plus jitter");
});
