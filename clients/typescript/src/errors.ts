/** What the gateway refused, with its own reason code and detail (`{"reason", "detail"}`). */
export class FeedloopError extends Error {
  readonly status: number;
  readonly reason: string;
  readonly detail: string;

  constructor(status: number, reason: string, detail: string) {
    super(`${status} ${reason}: ${detail}`);
    this.name = "FeedloopError";
    this.status = status;
    this.reason = reason;
    this.detail = detail;
  }
}

/** The error of a non-success answer; a body that is not feedloop's shape (a proxy's 502
 * page) keeps its text as the detail. */
export async function errorOf(response: Response): Promise<FeedloopError> {
  const text = await response.text();
  try {
    const body = JSON.parse(text) as { reason?: unknown; detail?: unknown };
    if (typeof body.reason === "string") {
      return new FeedloopError(response.status, body.reason, String(body.detail ?? ""));
    }
  } catch {
    // not JSON: fall through
  }
  return new FeedloopError(response.status, "error", text || response.statusText);
}
