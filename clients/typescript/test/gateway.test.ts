// Against a real gateway: tests/clients/test_typescript_sdk.py starts one and sets the
// variables, then checks the archive for what these sent.
import assert from "node:assert/strict";
import { test } from "node:test";
import { FeedloopClient, FeedloopError } from "../src/index.js";

const { FEEDLOOP_URL, FEEDLOOP_KEY = "", FEEDLOOP_APP = "", FEEDLOOP_SESSION } = process.env;
// An app the gateway limits to one request a second: its second request is answered 429.
const { FEEDLOOP_LIMITED_KEY, FEEDLOOP_LIMITED_APP = "" } = process.env;
const skip = FEEDLOOP_URL ? false : "FEEDLOOP_URL is not set (pytest tests/clients runs these against a gateway)";
const options = { baseUrl: FEEDLOOP_URL ?? "", apiKey: FEEDLOOP_KEY, appId: FEEDLOOP_APP };
const session = FEEDLOOP_SESSION ?? `ts-${crypto.randomUUID()}`;
const skipLimited = skip || (FEEDLOOP_LIMITED_KEY ? false : "FEEDLOOP_LIMITED_KEY is not set");

test("an interaction and its thumbs up are accepted", { skip }, async () => {
  const feedloop = new FeedloopClient(options);
  const turn = feedloop.interaction({
    user_id: "ts-user", session_id: session, adapter: "base", propensity: 1.0,
    prompt: [{ role: "user", content: "How do I reverse an array?" }],
    response: "Use items.reverse().", context: { domain: "code", locale: "en", client: "typescript" },
  });
  const result = await feedloop.sendEvents([turn, feedloop.thumbs(turn, true)]);
  assert.deepEqual(result, { accepted: 2, rejected: 0, errors: [] });
});

test("a refused event comes back with its index and reason, the rest is accepted", { skip }, async () => {
  const feedloop = new FeedloopClient(options);
  const bad = feedloop.feedback("ts-no-such-interaction", "thumbs", { session_id: session, value: 3 });
  const result = await feedloop.sendEvents([bad]);
  assert.equal(result.accepted, 0);
  assert.deepEqual(result.errors.map((e) => [e.index, e.event_id, e.reason]), [[0, bad.event_id, "schema_violation"]]);
});

test("a wrong key throws FeedloopError 401", { skip }, async () => {
  const feedloop = new FeedloopClient({ ...options, apiKey: "not-the-key" });
  const error = await feedloop.sendEvents([]).catch((e: unknown) => e);
  assert.ok(error instanceof FeedloopError);
  assert.equal(error.status, 401);
  assert.equal(error.reason, "unauthenticated");
});

test("route answers an adapter and its propensity", { skip }, async () => {
  const answer = await new FeedloopClient(options).route({ domain: "code" });
  assert.equal(typeof answer.adapter, "string");
  assert.ok(answer.propensity > 0 && answer.propensity <= 1);
  assert.equal(answer.probabilities[answer.adapter], answer.propensity);
});

test("a 429 is retried after the gateway's Retry-After", { skip: skipLimited }, async () => {
  const feedloop = new FeedloopClient({ ...options, apiKey: FEEDLOOP_LIMITED_KEY ?? "", appId: FEEDLOOP_LIMITED_APP });
  const started = Date.now();
  const answers = [await feedloop.sendEvents([]), await feedloop.sendEvents([])];
  assert.deepEqual(answers.map((a) => a.accepted), [0, 0]);
  assert.ok(Date.now() - started >= 1000, "the second request was not held back by the rate limit");
});
