// A real, certified OpenID provider (oidc-provider 9) for consent-flow's integration tests,
// benchmarks and demo, with headless login/consent pages and optional test controls.
//
// Run: npm ci --prefix examples/provider && node examples/provider/server.mjs
//
// Configuration (environment variables):
//   PORT                 Port to listen on (default 9090; 0 picks a free port, and the READY line
//                        tells which one).
//   HOST                 Address to listen on (default 127.0.0.1: its login page lets anyone sign
//                        in as anyone; docker compose sets 0.0.0.0 inside its private network).
//   ISSUER               Issuer identifier (default http://127.0.0.1:$PORT, with the real port).
//   RESOURCE             The one accepted RFC 8707 resource indicator (default $ISSUER/api). Its
//                        scopes are "notes:read notes:write"; access tokens for it are opaque.
//                        Any other `resource` value gets invalid_target.
//   CLIENTS              JSON array of clients:
//                          [{"client_id", "client_secret", "redirect_uris": [...],
//                            "token_endpoint_auth_method"?: "client_secret_basic" (default)}]
//                        Other client metadata given is passed through to oidc-provider.
//                        Every client gets grant_types authorization_code + refresh_token.
//                        Default: consent-flow-demo / demo-secret /
//                        http://127.0.0.1:8080/oauth/callback.
//   ACCESS_TOKEN_TTL     Access token lifetime in seconds (default 3600).
//   REFRESH_TOKEN_TTL    Refresh token lifetime in seconds (default 1209600, 14 days).
//   ROTATE_REFRESH_TOKEN "1": rotate on every refresh (default); "0": never rotate.
//   REFRESH_EXPIRES_IN   "1": token responses that carry a refresh token also carry
//                        `refresh_expires_in`, the seconds that refresh token has left (as
//                        Keycloak and Nextcloud's oidc app send it). oidc-provider does not send
//                        it natively: a Koa middleware around the token endpoint adds it to the
//                        JSON. Default off.
//   GRANT_ONLY           Space-separated scopes: consent grants only the requested scopes among
//                        them and rejects the rest, as a user unticking boxes would (default: grant
//                        every scope requested). A login's consent form may override it (below).
//   NO_REVOCATION        "1": no revocation endpoint (as Nextcloud's oidc app): discovery names no
//                        `revocation_endpoint` and POST /token/revocation answers 404. Default off.
//   TEST_CONTROLS        "1" enables the /__test/ control endpoints (off by default).
//   EXIT_WITH_STDIN      "1": exit when stdin reaches EOF, so that the provider dies with the
//                        process that spawned it (the Python driver sets this).
//
// On start-up prints exactly one line to stdout, `READY <issuer>`, once listening.
//
// Headless interaction (always on; devInteractions is disabled):
//   GET  /interaction/:uid          login form (#login, #signin) or consent page (#approve, #deny)
//   POST /interaction/:uid/login    form field `login`: any non-empty name; it becomes `sub`
//   POST /interaction/:uid/confirm  grants every requested scope, claim and resource scope; with
//                                   form field `grant_only` (space-separated scopes), or else
//                                   GRANT_ONLY, only the requested scopes among those
//   POST /interaction/:uid/abort    finishes the request with error=access_denied
//
// Test controls (TEST_CONTROLS=1 only), JSON in and out:
//   POST /__test/fault          Replace the fault set ({} clears it). Fields (all optional):
//                                 token_status: HTTP status the next `count` token requests get,
//                                   without reaching the provider, with body
//                                   {"error": token_error || "temporarily_unavailable",
//                                    "error_description": token_error_description (if given)};
//                                   token_error may be any code: "invalid_grant" (a dead grant),
//                                   "invalid_client", "unauthorized_client", "expired_client"
//                                   (client-level errors), ...;
//                                 retry_after: seconds, sent as Retry-After with token_status;
//                                 token_delay_ms: delay the next `count` token requests;
//                                 id_token: tamper MODE for the next `count` token responses that
//                                   carry an id_token (see ID_TOKEN_MODES below);
//                                 count: how many requests each named fault applies to (default 1).
//   GET  /__test/stats          Counters taken from the provider's events (see `stats` below).
//   POST /__test/stats/reset    Zero the counters.
//   POST /__test/revoke-grant   {"account": "alice", "client_id"?: "..."}: revokes every grant of
//                               that account (and their tokens); answers {"revoked": n}.
//   POST /__test/introspect     {"token": "..."}: looks the access or refresh token up directly in
//                               the provider's storage (no client authentication) and answers
//                               {"active": bool, "token_type", "client_id", "sub", "scope", ...}.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { promisify } from 'node:util';

const generateKeyPair = promisify(crypto.generateKeyPair);

async function newRsaKey() {
  const { privateKey } = await generateKeyPair('rsa', { modulusLength: 2048 });
  return privateKey;
}

// Start-up time: generate the signing key on libuv's thread pool while oidc-provider loads.
const signingKeyPromise = newRsaKey();
const { default: Provider, errors } = await import('oidc-provider');

// ---------------------------------------------------------------------------------------------
// Configuration from the environment

function envInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name} must be a non-negative integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

const PORT = envInt('PORT', 9090);
const HOST = process.env.HOST || '127.0.0.1';
const ACCESS_TOKEN_TTL = envInt('ACCESS_TOKEN_TTL', 3600);
const REFRESH_TOKEN_TTL = envInt('REFRESH_TOKEN_TTL', 14 * 24 * 60 * 60);
const ROTATE_REFRESH_TOKEN = (process.env.ROTATE_REFRESH_TOKEN ?? '1') !== '0';
const TEST_CONTROLS = process.env.TEST_CONTROLS === '1';
const REFRESH_EXPIRES_IN = process.env.REFRESH_EXPIRES_IN === '1';
const NO_REVOCATION = process.env.NO_REVOCATION === '1';
const GRANT_ONLY = (process.env.GRANT_ONLY ?? '').split(' ').filter(Boolean);

const DEFAULT_CLIENTS = [{
  client_id: 'consent-flow-demo',
  client_secret: 'demo-secret',
  redirect_uris: ['http://127.0.0.1:8080/oauth/callback'],
  token_endpoint_auth_method: 'client_secret_basic',
}];

const CLIENTS = (process.env.CLIENTS ? JSON.parse(process.env.CLIENTS) : DEFAULT_CLIENTS)
  .map((client) => ({
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    ...client,
    token_endpoint_auth_method: client.token_endpoint_auth_method ?? 'client_secret_basic',
  }));

// Scope values with a meaning for OpenID Connect itself, and the resource server's scopes.
const OIDC_SCOPES = ['openid', 'offline_access', 'profile', 'email'];
const RESOURCE_SCOPES = 'notes:read notes:write';

// ---------------------------------------------------------------------------------------------
// Storage: a Map-based adapter without eviction. The built-in memory adapter is an LRU of about
// 1,000 entries, so in long test runs idle refresh tokens silently disappear ("not found").
// Entries expire after `expiresIn` seconds (checked on read, plus a periodic sweep).

const store = new Map(); // `${model}:${id}` -> { payload, expiresAt (ms epoch, or Infinity) }
const uidIndex = new Map(); // session uid -> session id
const userCodeIndex = new Map(); // user code -> id
const grantIndex = new Map(); // grant id -> Set of store keys of tokens that belong to it

function liveEntry(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry;
}

class MapAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(key, { payload: structuredClone(payload), expiresAt });
    if (this.model === 'Session' && payload.uid) uidIndex.set(payload.uid, id);
    if (payload.userCode) userCodeIndex.set(payload.userCode, id);
    if (payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    const entry = liveEntry(this.key(id));
    // A copy, so that nothing outside the adapter mutates what is stored.
    return entry ? structuredClone(entry.payload) : undefined;
  }

  async findByUid(uid) {
    const id = uidIndex.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = userCodeIndex.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const entry = liveEntry(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    const key = this.key(id);
    const entry = store.get(key);
    store.delete(key);
    if (entry?.payload.uid && uidIndex.get(entry.payload.uid) === id) uidIndex.delete(entry.payload.uid);
    if (entry?.payload.userCode) userCodeIndex.delete(entry.payload.userCode);
    if (entry?.payload.grantId) grantIndex.get(entry.payload.grantId)?.delete(key);
  }

  // Called once per token model when a grant is revoked: remove this model's tokens of the grant.
  async revokeByGrantId(grantId) {
    const keys = grantIndex.get(grantId);
    if (!keys) return;
    const prefix = `${this.model}:`;
    for (const key of [...keys]) {
      if (key.startsWith(prefix)) {
        store.delete(key);
        keys.delete(key);
      }
    }
    if (keys.size === 0) grantIndex.delete(grantId);
  }
}

function sweepExpired() {
  const now = Date.now();
  for (const [key, entry] of store) {
    if (entry.expiresAt <= now) {
      store.delete(key);
      const { grantId, uid, userCode } = entry.payload;
      const id = key.slice(key.indexOf(':') + 1);
      if (grantId) grantIndex.get(grantId)?.delete(key);
      if (uid && uidIndex.get(uid) === id) uidIndex.delete(uid);
      if (userCode && userCodeIndex.get(userCode) === id) userCodeIndex.delete(userCode);
    }
  }
  for (const [grantId, keys] of grantIndex) if (keys.size === 0) grantIndex.delete(grantId);
}
setInterval(sweepExpired, 60_000).unref();

// ---------------------------------------------------------------------------------------------
// Keys. The signing key is generated at start-up and handed to oidc-provider as `jwks`, so that
// the test controls can re-sign deliberately wrong ID tokens with the real key.

function privateJwk(privateKey, kid) {
  return { ...privateKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };
}

// ---------------------------------------------------------------------------------------------
// Small HTTP helpers for the routes served next to the provider's.

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

async function readBody(ctx, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of ctx.req) {
    size += chunk.length;
    if (size > limit) ctx.throw(413, 'request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readForm(ctx) {
  return new URLSearchParams(await readBody(ctx));
}

async function readJson(ctx) {
  const text = await readBody(ctx);
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch {
    return ctx.throw(400, 'body must be JSON');
  }
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(title)}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:28em;margin:3em auto;padding:0 1em}
input,button{font-size:1em;padding:.4em .8em;margin:.3em 0}
form{display:inline-block;margin-right:.5em}
code{background:#eee;padding:0 .2em}
</style>
</head>
<body>
${body}
</body>
</html>
`;
}

function sendHtml(ctx, status, html) {
  ctx.status = status;
  ctx.type = 'html';
  ctx.set('Cache-Control', 'no-store');
  ctx.body = html;
}

// ---------------------------------------------------------------------------------------------
// ID token tampering, modelled on the OpenID Foundation's RP certification tests.

const b64json = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
const unb64json = (part) => JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));

function signRs256(header, claims, privateKey) {
  const input = `${b64json(header)}.${b64json(claims)}`;
  const signature = crypto.sign('sha256', Buffer.from(input), privateKey).toString('base64url');
  return `${input}.${signature}`;
}

const ID_TOKEN_MODES = new Set([
  'bad_signature', 'alg_none', 'wrong_issuer', 'wrong_audience', 'wrong_nonce', 'no_nonce',
  'expired', 'iat_future', 'no_sub', 'other_key', 'wrong_azp',
]);

let otherKey; // made on first use: start-up only pays for the real key

async function tamperIdToken(idToken, mode, signingKey) {
  const [headerPart, claimsPart, signaturePart] = idToken.split('.');
  const header = unb64json(headerPart);
  const claims = unb64json(claimsPart);
  const now = Math.floor(Date.now() / 1000);
  const lifetime = claims.exp - claims.iat;

  switch (mode) {
    case 'bad_signature': {
      // Alter the decoded bytes: flipping a base64url character could land in padding bits.
      const signature = Buffer.from(signaturePart, 'base64url');
      signature[signature.length >> 1] ^= 0xff;
      return `${headerPart}.${claimsPart}.${signature.toString('base64url')}`;
    }
    case 'alg_none':
      return `${b64json({ alg: 'none', typ: header.typ })}.${claimsPart}.`;
    case 'other_key':
      otherKey ??= await newRsaKey();
      return signRs256({ ...header, kid: `not-in-jwks-${crypto.randomUUID()}` }, claims, otherKey);
    case 'wrong_issuer':
      claims.iss = 'https://wrong-issuer.example.test';
      break;
    case 'wrong_audience':
      claims.aud = 'some-other-client';
      delete claims.azp;
      break;
    case 'wrong_nonce':
      claims.nonce = `wrong-${crypto.randomBytes(8).toString('base64url')}`;
      break;
    case 'no_nonce':
      delete claims.nonce;
      break;
    case 'expired':
      // Keep the token internally consistent (iat <= auth_time-ish <= exp) so only exp is wrong.
      claims.exp = now - 300;
      claims.iat = claims.exp - lifetime;
      if (claims.auth_time > claims.iat) claims.auth_time = claims.iat;
      break;
    case 'iat_future':
      claims.iat = now + 3600;
      claims.exp = claims.iat + lifetime;
      break;
    case 'no_sub':
      delete claims.sub;
      break;
    case 'wrong_azp': {
      const clientId = Array.isArray(claims.aud) ? claims.aud[0] : claims.aud;
      claims.aud = [clientId, 'some-other-client'];
      claims.azp = 'some-other-client';
      break;
    }
    default:
      throw new Error(`unknown id_token mode ${mode}`);
  }
  // Re-signed with the provider's real key and kid: only the named claim is wrong.
  return signRs256(header, claims, signingKey);
}

// ---------------------------------------------------------------------------------------------

async function main() {
  // Listen first, so that PORT=0 works: the issuer needs the real port.
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(PORT, HOST, resolve);
  });
  const { port } = server.address();
  const ISSUER = process.env.ISSUER || `http://127.0.0.1:${port}`;
  const RESOURCE = process.env.RESOURCE || `${ISSUER}/api`;

  const signingKey = await signingKeyPromise;
  const signingJwk = privateJwk(signingKey, `rs256-${crypto.randomBytes(6).toString('base64url')}`);

  const provider = new Provider(ISSUER, {
    adapter: MapAdapter,
    clients: CLIENTS,
    // Authorization code flow only: no implicit or hybrid response types in discovery.
    responseTypes: ['code'],
    jwks: { keys: [signingJwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    // Tests check expiry exactly; the default tolerance (15 s) keeps expired tokens "active".
    clockTolerance: 0,
    pkce: { required: () => true },
    scopes: [...OIDC_SCOPES, ...RESOURCE_SCOPES.split(' ')],
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    async findAccount(ctx, id) {
      // Any account id exists: the login name is the subject.
      return {
        accountId: id,
        async claims() {
          return {
            sub: id, name: id, preferred_username: id, email: `${id}@example.test`, email_verified: true,
          };
        },
      };
    },
    // Same rule as the default, spelled out because the project relies on it.
    async issueRefreshToken(ctx, client, code) {
      return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
    },
    // Explicit: the default only rotates a confidential client's token after 70% of its lifetime.
    rotateRefreshToken: () => ROTATE_REFRESH_TOKEN,
    // The project's clients are server-side: no browser calls the token endpoint cross-origin.
    clientBasedCORS: () => false,
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL || ACCESS_TOKEN_TTL,
      AuthorizationCode: 60,
      ClientCredentials: 600,
      DeviceCode: 600,
      BackchannelAuthenticationRequest: 600,
      PreAuthorizedCode: 600,
      IdToken: 3600,
      Interaction: 3600,
      RefreshToken: REFRESH_TOKEN_TTL,
      // A grant or session that ends before its refresh token would end the refresh token too.
      Grant: Math.max(REFRESH_TOKEN_TTL, 14 * 24 * 60 * 60),
      Session: Math.max(REFRESH_TOKEN_TTL, 14 * 24 * 60 * 60),
    },
    interactions: {
      url: (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: !NO_REVOCATION, allowedPolicy: async () => true },
      introspection: {
        enabled: true,
        // Any authenticated client may introspect; public clients only their own tokens.
        allowedPolicy: async (ctx, client, token) => (
          client.clientAuthMethod !== 'none' || token.clientId === client.clientId
        ),
      },
      resourceIndicators: {
        enabled: true,
        // No resource requested: no resource (the access token is then for userinfo).
        defaultResource: async (ctx, client, oneOf) => oneOf ?? undefined,
        getResourceServerInfo: async (ctx, resourceIndicator) => {
          if (resourceIndicator !== RESOURCE) throw new errors.InvalidTarget();
          return { scope: RESOURCE_SCOPES, accessTokenFormat: 'opaque' };
        },
      },
    },
    async renderError(ctx, out) {
      const rows = Object.entries(out)
        .map(([key, value]) => `<p><code>${escapeHtml(key)}</code>: ${escapeHtml(value)}</p>`)
        .join('\n');
      sendHtml(ctx, ctx.status, page('Error', `<h1>Error</h1>\n<div id="error">${rows}</div>`));
    },
  });

  // oidc-provider validates static clients lazily: fail at start-up on bad CLIENTS instead.
  for (const { client_id: clientId } of CLIENTS) {
    if (!await provider.Client.find(clientId)) throw new Error(`client ${clientId} is invalid`);
  }

  // -------------------------------------------------------------------------------------------
  // Headless login and consent. Koa middleware placed before the provider's own routes.

  const INTERACTION = /^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/;

  function loginPage(uid, details, message) {
    const error = message ? `<p id="error" role="alert">${escapeHtml(message)}</p>\n` : '';
    return page('Sign in', `<h1>Sign in</h1>
<p>to continue to <code>${escapeHtml(details.params.client_id)}</code></p>
${error}<form id="login-form" method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label for="login">Login</label>
<input id="login" name="login" type="text" required autofocus>
<button id="signin" type="submit">Sign in</button>
</form>`);
  }

  function consentPage(uid, details) {
    const scopes = String(details.params.scope ?? '').split(' ').filter(Boolean);
    const resources = [details.params.resource ?? []].flat();
    const items = scopes.map((s) => `<li class="scope">${escapeHtml(s)}</li>`).join('\n');
    const resourceItems = resources.map((r) => `<li class="resource">${escapeHtml(r)}</li>`).join('\n');
    return page('Authorize', `<h1>Authorize</h1>
<p><code>${escapeHtml(details.params.client_id)}</code> asks <code>${escapeHtml(details.session?.accountId)}</code> for:</p>
<ul id="scopes">
${items}
</ul>
${resources.length ? `<p>at the resource</p>\n<ul id="resources">\n${resourceItems}\n</ul>\n` : ''}<form id="approve-form" method="post" action="/interaction/${escapeHtml(uid)}/confirm">
<button id="approve" type="submit">Approve</button>
</form>
<form id="deny-form" method="post" action="/interaction/${escapeHtml(uid)}/abort">
<button id="deny" type="submit">Deny</button>
</form>`);
  }

  async function finish(ctx, result, mergeWithLastSubmission) {
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission });
    ctx.set('Cache-Control', 'no-store');
    ctx.redirect(returnTo);
    ctx.status = 303; // after a POST: the browser follows with a GET
  }

  async function confirm(ctx, details) {
    const { prompt: { details: missing }, params, session: { accountId } } = details;
    const form = await readForm(ctx);
    const chosen = (form.get('grant_only') ?? '').split(' ').filter(Boolean);
    const only = chosen.length ? chosen : GRANT_ONLY;
    let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
    const isNew = !grant; // also when the session's grant was revoked meanwhile
    grant ??= new provider.Grant({ accountId, clientId: params.client_id });
    // The prompt details list what the request asks for and the grant lacks: grant all of it,
    // or only what `grant_only` names; the rest is rejected, so consent is not asked again.
    if (missing.missingOIDCScope) {
      const granted = missing.missingOIDCScope.filter((s) => !only.length || only.includes(s));
      const rejected = missing.missingOIDCScope.filter((s) => !granted.includes(s));
      if (granted.length) grant.addOIDCScope(granted.join(' '));
      if (rejected.length) grant.rejectOIDCScope(rejected.join(' '));
    }
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await finish(ctx, { consent: isNew ? { grantId } : {} }, true);
  }

  provider.use(async (ctx, next) => {
    const match = INTERACTION.exec(ctx.path);
    if (!match) return next();
    const [, uid, action] = match;
    if ((action ? 'POST' : 'GET') !== ctx.method) {
      sendHtml(ctx, 405, page('Error', '<h1>Method not allowed</h1>'));
      return undefined;
    }
    try {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      if (details.uid !== uid) throw new errors.SessionNotFound('interaction uid mismatch');
      const prompt = details.prompt.name;

      if (!action) {
        if (prompt === 'login') sendHtml(ctx, 200, loginPage(uid, details));
        else if (prompt === 'consent') sendHtml(ctx, 200, consentPage(uid, details));
        else throw new Error(`unsupported prompt ${prompt}`);
      } else if (action === 'abort') {
        await finish(ctx, { error: 'access_denied', error_description: 'End-User aborted interaction' }, false);
      } else if (action === 'login') {
        if (prompt !== 'login') throw new errors.InvalidRequest(`interaction is at the ${prompt} prompt`);
        const login = ((await readForm(ctx)).get('login') ?? '').trim();
        if (!login) {
          sendHtml(ctx, 400, loginPage(uid, details, 'Enter a login name.'));
          return undefined;
        }
        await finish(ctx, { login: { accountId: login } }, false);
      } else {
        if (prompt !== 'consent') throw new errors.InvalidRequest(`interaction is at the ${prompt} prompt`);
        await confirm(ctx, details);
      }
    } catch (err) {
      const status = err.status && err.status < 500 ? err.status : 400;
      const text = `${err.error ?? err.name}: ${err.error_description ?? err.message}`;
      sendHtml(ctx, status, page('Error', `<h1>Error</h1>\n<p id="error">${escapeHtml(text)}</p>`));
    }
    return undefined;
  });

  if (NO_REVOCATION) {
    // The feature is off, so oidc-provider mounts no route; say so plainly at the usual path.
    provider.use(async (ctx, next) => {
      if (ctx.path !== '/token/revocation') return next();
      ctx.status = 404;
      ctx.set('Cache-Control', 'no-store');
      ctx.body = { error: 'not_found', error_description: 'this provider cannot revoke tokens' };
      return undefined;
    });
  }

  if (REFRESH_EXPIRES_IN) {
    // Placed before the test controls, so it wraps their fault layer: faulted answers carry no
    // refresh token and pass untouched.
    const tokenPath = new URL(provider.urlFor('token')).pathname;
    provider.use(async (ctx, next) => {
      await next();
      if (ctx.path !== tokenPath || ctx.status !== 200) return;
      const body = ctx.body;
      if (typeof body?.refresh_token !== 'string') return;
      const token = await provider.RefreshToken.find(body.refresh_token, { ignoreExpiration: true });
      if (!token?.exp) return;
      const left = Math.max(0, token.exp - Math.floor(Date.now() / 1000));
      ctx.body = { ...body, refresh_expires_in: left };
    });
  }

  // -------------------------------------------------------------------------------------------
  // Test controls: fault injection on the token endpoint, statistics, grant revocation.

  if (TEST_CONTROLS) installTestControls(provider, { signingKey });

  server.on('request', provider.callback());

  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => process.exit(0));
  if (process.env.EXIT_WITH_STDIN === '1') {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.resume();
  }

  process.stdout.write(`READY ${ISSUER}\n`);
}

function newStats() {
  return {
    token_requests: 0, // every request to the token endpoint, faulted ones included
    faults_injected: 0, // token requests answered by the fault layer (token_status)
    delays_injected: 0,
    id_tokens_tampered: 0,
    token_success: 0,
    token_errors: 0,
    code_exchanges: 0, // grant_type=authorization_code requests that reached the provider
    refresh_requests: 0, // grant_type=refresh_token requests that reached the provider
    refresh_success: 0,
    refresh_errors: 0,
    refresh_tokens_issued: 0,
    refresh_tokens_rotated: 0, // refresh_token.consumed: the old token of a rotation
    refresh_reuse_detected: 0, // a rotated (consumed) refresh token was presented again
    access_tokens_issued: 0,
    responses_dropped: 0,
    revocations: 0, // successful calls to the revocation endpoint (RFC 7009)
    grants_revoked: 0, // any cause: reuse, revocation endpoint, code replay, /__test/revoke-grant
    grants_revoked_by_control: 0,
    authorizations: 0,
    authorization_errors: 0,
    server_errors: 0,
    grant_errors: {}, // "error: detail" -> count, the detail that responses never carry
  };
}

function installTestControls(provider, { signingKey }) {
  let stats = newStats();
  let faults = {};

  // Path from the discovery document's token_endpoint (a mount path would be part of it).
  const tokenPath = new URL(provider.urlFor('token')).pathname;
  const revocationPath = NO_REVOCATION ? null : new URL(provider.urlFor('revocation')).pathname;

  // Counts answered revocations (RFC 7009); oidc-provider emits no event of its own for them.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === revocationPath && ctx.method === 'POST' && ctx.status === 200) {
      stats.revocations += 1;
    }
  });

  const grantType = (ctx) => ctx.oidc?.params?.grant_type;

  provider.on('grant.success', (ctx) => {
    stats.token_success += 1;
    if (grantType(ctx) === 'refresh_token') {
      stats.refresh_requests += 1;
      stats.refresh_success += 1;
    } else if (grantType(ctx) === 'authorization_code') {
      stats.code_exchanges += 1;
    }
  });
  provider.on('grant.error', (ctx, err) => {
    stats.token_errors += 1;
    const key = `${err.error}: ${err.error_detail ?? err.error_description ?? ''}`;
    stats.grant_errors[key] = (stats.grant_errors[key] ?? 0) + 1;
    if (grantType(ctx) === 'refresh_token') {
      stats.refresh_requests += 1;
      stats.refresh_errors += 1;
      // Reuse of a rotated refresh token: the presented token was found and already consumed
      // (oidc-provider then destroys it and revokes the whole grant before throwing invalid_grant
      // with detail "refresh token already used"; the response itself only says invalid_grant).
      if (err.error === 'invalid_grant' && ctx.oidc.entities.RefreshToken?.consumed) {
        stats.refresh_reuse_detected += 1;
      }
    } else if (grantType(ctx) === 'authorization_code') {
      stats.code_exchanges += 1;
    }
  });
  provider.on('grant.revoked', () => { stats.grants_revoked += 1; });
  provider.on('refresh_token.saved', () => { stats.refresh_tokens_issued += 1; });
  provider.on('refresh_token.consumed', () => { stats.refresh_tokens_rotated += 1; });
  provider.on('access_token.saved', () => { stats.access_tokens_issued += 1; });
  provider.on('authorization.success', () => { stats.authorizations += 1; });
  provider.on('authorization.error', () => { stats.authorization_errors += 1; });
  provider.on('server_error', (ctx, err) => {
    stats.server_errors += 1;
    console.error('server_error', err);
  });

  function parseFault(body) {
    const count = body.count ?? 1;
    if (!Number.isInteger(count) || count < 0) throw new Error('count must be a non-negative integer');
    const next = {};
    if (body.token_status !== undefined) {
      if (!Number.isInteger(body.token_status) || body.token_status < 100 || body.token_status > 599) {
        throw new Error('token_status must be an HTTP status code');
      }
      next.status = {
        remaining: count,
        status: body.token_status,
        error: body.token_error ?? 'temporarily_unavailable',
        description: body.token_error_description,
        retryAfter: body.retry_after,
      };
      if (next.status.description !== undefined && typeof next.status.description !== 'string') {
        throw new Error('token_error_description must be a string');
      }
    }
    if (body.token_delay_ms !== undefined) {
      if (!Number.isInteger(body.token_delay_ms) || body.token_delay_ms < 0) {
        throw new Error('token_delay_ms must be a non-negative integer');
      }
      next.delay = { remaining: count, ms: body.token_delay_ms };
    }
    if (body.token_drop_response !== undefined) {
      // The provider handles the request (a refresh token rotates), then the connection is cut
      // before the answer: the client's view of a response lost in transit.
      next.drop = { remaining: count };
    }
    if (body.id_token !== undefined) {
      if (!ID_TOKEN_MODES.has(body.id_token)) {
        throw new Error(`id_token must be one of ${[...ID_TOKEN_MODES].join(', ')}`);
      }
      next.idToken = { remaining: count, mode: body.id_token };
    }
    return next;
  }

  const describeFaults = () => Object.fromEntries(Object.entries(faults).filter(([, f]) => f.remaining > 0));

  // The fault layer: runs before the provider's routes for the token endpoint only.
  provider.use(async (ctx, next) => {
    if (ctx.path !== tokenPath) return next();
    stats.token_requests += 1;

    if (faults.delay?.remaining > 0) {
      faults.delay.remaining -= 1;
      stats.delays_injected += 1;
      await new Promise((resolve) => { setTimeout(resolve, faults.delay.ms); });
    }

    if (faults.status?.remaining > 0) {
      const fault = faults.status;
      fault.remaining -= 1;
      stats.faults_injected += 1;
      ctx.status = fault.status;
      ctx.set('Cache-Control', 'no-store');
      if (fault.retryAfter !== undefined) ctx.set('Retry-After', String(fault.retryAfter));
      ctx.body = { error: fault.error };
      if (fault.description !== undefined) ctx.body.error_description = fault.description;
      return undefined;
    }

    await next();

    if (faults.drop?.remaining > 0 && ctx.status === 200) {
      faults.drop.remaining -= 1;
      stats.responses_dropped += 1;
      ctx.req.socket.destroy();
      return undefined;
    }

    // The provider has set ctx.body to the token response object; Koa serialises it later.
    const body = ctx.body;
    if (faults.idToken?.remaining > 0 && ctx.status === 200 && typeof body?.id_token === 'string') {
      faults.idToken.remaining -= 1;
      stats.id_tokens_tampered += 1;
      ctx.body = { ...body, id_token: await tamperIdToken(body.id_token, faults.idToken.mode, signingKey) };
    }
    return undefined;
  });

  async function revokeGrantsOf(account, clientId) {
    const grantIds = [];
    for (const [key, entry] of store) {
      if (!key.startsWith('Grant:') || entry.expiresAt <= Date.now()) continue;
      const { accountId, clientId: grantClient, jti } = entry.payload;
      if (accountId === account && (!clientId || clientId === grantClient)) grantIds.push(jti);
    }
    for (const grantId of grantIds) {
      await Promise.all([
        provider.AccessToken.revokeByGrantId(grantId),
        provider.RefreshToken.revokeByGrantId(grantId),
        provider.AuthorizationCode.revokeByGrantId(grantId),
        provider.Grant.adapter.destroy(grantId),
      ]);
    }
    stats.grants_revoked += grantIds.length;
    stats.grants_revoked_by_control += grantIds.length;
    return grantIds.length;
  }

  async function introspect(token) {
    for (const [Model, tokenType] of [[provider.AccessToken, 'access_token'], [provider.RefreshToken, 'refresh_token']]) {
      const found = await Model.find(token, { ignoreExpiration: true });
      if (!found) continue;
      const grant = found.grantId ? await provider.Grant.find(found.grantId) : undefined;
      const active = !found.isExpired && !found.consumed && Boolean(grant);
      return {
        active,
        token_type: tokenType,
        client_id: found.clientId,
        sub: found.accountId,
        scope: found.scope,
        exp: found.exp,
        iat: found.iat,
        grant_id: found.grantId,
        expired: found.isExpired,
        consumed: Boolean(found.consumed),
        grant_exists: Boolean(grant),
        aud: found.aud ?? found.resourceServer?.audience,
      };
    }
    return { active: false };
  }

  const json = (ctx, status, body) => {
    ctx.status = status;
    ctx.set('Cache-Control', 'no-store');
    ctx.body = body;
  };

  provider.use(async (ctx, next) => {
    if (!ctx.path.startsWith('/__test/')) return next();
    const route = `${ctx.method} ${ctx.path}`;
    try {
      switch (route) {
        case 'POST /__test/fault':
          faults = parseFault(await readJson(ctx));
          return json(ctx, 200, { faults: describeFaults() });
        case 'GET /__test/fault':
          return json(ctx, 200, { faults: describeFaults() });
        case 'GET /__test/stats':
          return json(ctx, 200, stats);
        case 'POST /__test/stats/reset':
          stats = newStats();
          return json(ctx, 200, stats);
        case 'POST /__test/revoke-grant': {
          const { account, client_id: clientId } = await readJson(ctx);
          if (typeof account !== 'string' || !account) throw new Error('account is required');
          return json(ctx, 200, { revoked: await revokeGrantsOf(account, clientId) });
        }
        case 'POST /__test/introspect': {
          const { token } = await readJson(ctx);
          if (typeof token !== 'string' || !token) throw new Error('token is required');
          return json(ctx, 200, await introspect(token));
        }
        default:
          return json(ctx, 404, { error: 'not_found', error_description: route });
      }
    } catch (err) {
      return json(ctx, err.status ?? 400, { error: 'invalid_request', error_description: err.message });
    }
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
