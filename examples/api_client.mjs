// consent-flow's HTTP API from Node.js (18+), with nothing but fetch.
//
//   CONSENT_API_KEY=... node examples/api_client.mjs alice
//
// Asks for alice's consent, prints the URL she approves at, waits until she has, gets an access
// token valid for at least a minute, then revokes. The key (one of the server's CONSENT_API_KEYS)
// comes from the environment; CONSENT_API_URL names the server (default http://127.0.0.1:8080).
// The token is a secret: this script says that it got one, never what it is.

const base = (process.env.CONSENT_API_URL ?? "http://127.0.0.1:8080").replace(/\/$/, "");
const key = process.env.CONSENT_API_KEY;
const user = process.argv[2];
const waitSeconds = Number(process.env.CONSENT_WAIT_SECONDS ?? 300);
if (!key || !user) {
  console.error("usage: CONSENT_API_KEY=... node api_client.mjs USER");
  process.exit(2);
}

const connection = `${base}/v1/connections/default/${encodeURIComponent(user)}`;

// Every answer is JSON; every error an RFC 9457 problem with a stable `code`.
async function call(method, url, body) {
  const response = await fetch(url, {
    method,
    headers: {
      Authorization: `Bearer ${key}`,
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) {
    throw new Error(`${method} ${url}: ${response.status} ${data.code}: ${data.detail}`);
  }
  return data;
}

const pending = await call("POST", connection, { scopes: ["openid", "offline_access"] });
console.log(`${user}: ${pending.state}`);
if (pending.state === "pending") {
  console.log(`approve at: ${pending.authorization_url}`);
}

const deadline = Date.now() + waitSeconds * 1000;
let status = pending;
while (status.state !== "provisioned") {
  if (status.state !== "pending" || Date.now() > deadline) {
    throw new Error(`${user} is ${status.state}: ${status.reason ?? "not approved in time"}`);
  }
  await new Promise((resolve) => setTimeout(resolve, 500));
  status = await call("GET", connection);
}
console.log(`${user}: ${status.state}, scopes ${status.scopes.join(" ")}`);

const token = await call("POST", `${connection}/token`, { min_ttl: 60 });
console.log(`got a ${token.token_type} token (${token.access_token.length} characters)`);

const revoked = await call("DELETE", connection, { reason: "example finished" });
console.log(`${user}: ${revoked.state} (${revoked.reason}), at the provider: ${revoked.provider_revocation}`);
