// xo-server-luksext: lets Xen Orchestra create luksext SRs.
//
// xo-server creates SRs only through per-type API methods
// (packages/xo-server/src/api/sr.mjs createExt, createLvm, ...; XO 6.7.1)
// and has none for a type it does not know. This plugin adds two, written
// the way sr.mjs writes createExt/probeZfs: `params` in XO's JSON-schema
// dialect (`optional: true`), `resolve: { host: ['host', 'host',
// 'administrate'] }`, the XAPI of the host from `xo.getXapi(host)`, and
// `xapi.call(...)` with the session added by the client:
//
//   sr.createLuksext  XAPI SR.create(host, device_config, 0, name_label,
//                     name_description, 'luksext', 'user', false, {}), the
//                     call @xen-orchestra/xapi sr.mjs Sr.create makes for
//                     createExt; returns the new SR's uuid.
//   sr.probeLuksext   XAPI SR.probe_ext(host, {}, 'luksext', {}): blank or
//                     used disks SR.create would take, and disks that already
//                     hold a luksext SR.
//
// No runtime dependency: it runs inside xo-server with nothing installed
// beside it. Secrets: the only one is the recovery passphrase; its
// parameter (recoveryPassword) and device-config key (recovery-password)
// match /password/i, the pattern xo-server's and xen-api's log obfuscation
// (@vates/obfuscate) and xapi's Secret handling use, and this file never
// logs a parameter value or a XAPI error object (xen-api attaches the call
// to it).

export const SR_TYPE = 'luksext'

// Device-config keys, as Plugin.Query documents them
// (sr-types/luksext/config.go); validated below the way SR.create's
// parseCreateConfig does (sr-types/luksext/sr_config.go), so a mistake is
// reported before XAPI is called and nothing is created half-way.
const KEYS = {
  device: 'device',
  recoveryPassword: 'recovery-password',
  recoveryFallback: 'recovery-fallback',
  tpm2PcrIds: 'tpm2-pcr-ids',
  tpm2PcrBank: 'tpm2-pcr-bank',
  tangUrl: 'tang-url',
  tangThp: 'tang-thp',
  tangTrust: 'tang-trust',
  sssThreshold: 'sss-threshold',
  force: 'force',
}

const hostParam = { type: 'string', description: 'the host whose local disk becomes the SR' }

export const createParams = {
  host: hostParam,
  nameLabel: { type: 'string' },
  nameDescription: { type: 'string', minLength: 0, optional: true },
  device: { type: 'string', description: 'block device, e.g. /dev/sdb or /dev/disk/by-id/... (erased)' },
  recoveryPassword: {
    type: 'string',
    minLength: 8,
    optional: true,
    description: 'recovery passphrase (second keyslot) that opens the disk when the TPM refuses',
  },
  recoveryFallback: {
    type: 'boolean',
    optional: true,
    description: 'keep the recovery passphrase in xapi so attach falls back to it by itself',
  },
  tpm2PcrIds: { type: 'string', optional: true, description: 'PCRs the key is sealed to, e.g. 7 or 0,2,7' },
  tpm2PcrBank: { enum: ['sha256', 'sha1'], optional: true },
  tangUrl: { type: 'string', optional: true, description: 'comma-separated Tang server URLs' },
  tangThp: { type: 'string', optional: true, description: 'comma-separated Tang key thumbprints, in tang-url order' },
  tangTrust: { type: 'boolean', optional: true, description: 'trust the Tang advertisement without a thumbprint' },
  sssThreshold: { type: 'integer', minimum: 1, optional: true, description: 'how many of {TPM, Tang servers} must agree' },
  force: { type: 'boolean', optional: true, description: 'erase a device that already holds data' },
}

export const probeParams = { host: hostParam }

const resolveHost = { host: ['host', 'host', 'administrate'] }

// LuksextError is what reaches the XO user: a plain Error (its message is
// what xo-server shows an admin) that keeps XAPI's code and params but not
// the call, so nothing of the request can leak through it.
export class LuksextError extends Error {
  constructor(message, { code, params } = {}) {
    super(message)
    this.name = 'LuksextError'
    if (code !== undefined) this.code = code
    if (params !== undefined) this.params = params
  }
}

const invalid = (key, sentence) => new LuksextError(`device-config:${key} ${sentence}`, { code: 'INVALID_PARAMETERS' })

const splitList = s =>
  (s ?? '')
    .split(',')
    .map(x => x.trim())
    .filter(x => x !== '')

// buildDeviceConfig checks the parameters like sr_config.go and returns
// the device_config map XAPI SR.create gets (strings only).
export function buildDeviceConfig(p) {
  const dc = {}
  const device = (p.device ?? '').trim()
  if (device === '') throw invalid(KEYS.device, 'is required, e.g. /dev/sdb')
  if (!device.startsWith('/')) throw invalid(KEYS.device, `must be an absolute path such as /dev/sdb, not "${device}"`)
  dc[KEYS.device] = device

  if (p.recoveryPassword !== undefined && p.recoveryPassword !== '') {
    if (p.recoveryPassword.length < 8) throw invalid(KEYS.recoveryPassword, 'must be at least 8 characters long')
    dc[KEYS.recoveryPassword] = p.recoveryPassword
  }
  if (p.recoveryFallback) {
    if (dc[KEYS.recoveryPassword] === undefined) throw invalid(KEYS.recoveryFallback, 'needs a recovery-password to fall back to')
    dc[KEYS.recoveryFallback] = 'true'
  }

  const ids = (p.tpm2PcrIds ?? '').trim()
  if (ids !== '') {
    const list = ids.split(',').map(s => s.trim())
    if (!list.every(s => /^\d{1,2}$/.test(s) && Number(s) <= 23)) {
      throw invalid(KEYS.tpm2PcrIds, `must be a comma-separated list of PCR numbers 0-23, got "${ids}"`)
    }
    dc[KEYS.tpm2PcrIds] = list.join(',')
  }
  if (p.tpm2PcrBank !== undefined && p.tpm2PcrBank !== '') {
    if (p.tpm2PcrBank !== 'sha256' && p.tpm2PcrBank !== 'sha1') {
      throw invalid(KEYS.tpm2PcrBank, `must be sha256 or sha1, got "${p.tpm2PcrBank}"`)
    }
    if (ids === '') throw invalid(KEYS.tpm2PcrBank, 'only makes sense with tpm2-pcr-ids')
    dc[KEYS.tpm2PcrBank] = p.tpm2PcrBank
  }

  const urls = splitList(p.tangUrl)
  const thps = splitList(p.tangThp)
  if (thps.length > 0 && thps.length !== urls.length) {
    throw invalid(KEYS.tangThp, `has ${thps.length} thumbprint(s) for ${urls.length} tang-url(s); give one per server, in the same order`)
  }
  if (urls.length > 0 && thps.length === 0 && !p.tangTrust) {
    throw invalid(KEYS.tangThp, 'is required with tang-url (run tang-show-keys on each server), or set tang-trust to accept the servers\' keys unverified')
  }
  for (const u of urls) {
    let ok = false
    try {
      const pu = new URL(u)
      ok = (pu.protocol === 'http:' || pu.protocol === 'https:') && pu.host !== ''
    } catch {}
    if (!ok) throw invalid(KEYS.tangUrl, `"${u}" is not an http(s) URL`)
  }
  if (urls.length > 0) dc[KEYS.tangUrl] = urls.join(',')
  if (thps.length > 0) dc[KEYS.tangThp] = thps.join(',')
  if (p.tangTrust) dc[KEYS.tangTrust] = 'true'

  if (p.sssThreshold !== undefined) {
    const n = p.sssThreshold
    if (!Number.isInteger(n) || n < 1 || n > 1 + urls.length) {
      throw invalid(KEYS.sssThreshold, `must be a number from 1 to ${1 + urls.length} (the TPM plus ${urls.length} Tang server(s)), got "${n}"`)
    }
    dc[KEYS.sssThreshold] = String(n)
  }
  if (p.force) dc[KEYS.force] = 'true'
  return dc
}

// xapiError turns a XAPI failure into words for the XO user. luksext's
// failures arrive as SR_BACKEND_FAILURE [name, sentence, ...] (xapi's
// storage_utils.ml transform_storage_exn keeps the plugin's code and
// params); the name and the sentence are what the administrator needs.
function xapiError(error, what, host) {
  const code = error?.code
  const params = Array.isArray(error?.params) ? error.params.map(String) : []
  if (typeof code === 'string' && code.startsWith('SR_BACKEND_FAILURE')) {
    const [name = code, sentence = ''] = params
    return new LuksextError(`${what} failed on host ${host.name_label ?? host.id}: ${name}: ${sentence}`.trim(), { code, params })
  }
  if (code === 'HANDLE_INVALID' || code === 'UUID_INVALID') {
    return new LuksextError(`${what}: host ${host.name_label ?? host.id} is not known to its pool any more (${code}); refresh XO and try again`, { code, params })
  }
  if (typeof code === 'string' && Array.isArray(error?.params)) {
    return new LuksextError(`${what} failed on host ${host.name_label ?? host.id}: ${code}(${params.join(', ')})`, { code, params })
  }
  // Transport failures (ECONNREFUSED, timeouts, ...): XAPI did not answer.
  return new LuksextError(`${what}: cannot reach the XAPI of host ${host.name_label ?? host.id} (${code ?? error?.message ?? error})`, {
    code: code ?? 'XAPI_UNREACHABLE',
  })
}

function getXapi(xo, host, what) {
  try {
    return xo.getXapi(host)
  } catch (error) {
    throw new LuksextError(`${what}: host ${host?.name_label ?? host?.id} is not connected to XO (${error?.message ?? error})`, {
      code: 'XAPI_UNREACHABLE',
    })
  }
}

// consoleLogger is used when xo-server does not hand one over (it does
// not: plugins log through their own logger). Fields are logged by key.
const consoleLogger = {
  debug() {},
  info: (msg, data) => console.info('[xo-server-luksext]', msg, data ?? ''),
  warn: (msg, data) => console.warn('[xo-server-luksext]', msg, data ?? ''),
  error: (msg, data) => console.error('[xo-server-luksext]', msg, data ?? ''),
}

export class LuksextPlugin {
  #xo
  #log
  #unload = []

  constructor({ xo, logger = consoleLogger }) {
    this.#xo = xo
    this.#log = logger
  }

  async load() {
    const xo = this.#xo
    const log = this.#log
    const plugin = this
    async function createLuksext(params) {
      return plugin.create(params)
    }
    createLuksext.description = 'create an encrypted local SR (luksext: LUKS2, key sealed to the TPM) on a disk of a host; erases the disk'
    createLuksext.params = createParams
    createLuksext.resolve = resolveHost

    async function probeLuksext(params) {
      return plugin.probe(params)
    }
    probeLuksext.description = 'list the disks of a host a luksext SR can be created on, and the luksext SRs already on its disks'
    probeLuksext.params = probeParams
    probeLuksext.resolve = resolveHost

    for (const [name, fn] of [
      ['sr.createLuksext', createLuksext],
      ['sr.probeLuksext', probeLuksext],
    ]) {
      try {
        // the same options object shape as xo-server-ipmi-sensors' calls
        this.#unload.push(xo.addApiMethod(name, fn, { description: fn.description, params: fn.params, resolve: fn.resolve }))
      } catch (error) {
        // xo-server throws "API method X already exists" (xo-mixins/api.mjs):
        // a newer xo-server has its own; keep it, and keep xo-server running.
        log.warn(`not registering ${name}: ${error?.message ?? error}`)
      }
    }
  }

  async unload() {
    for (const remove of this.#unload.splice(0)) remove()
  }

  async create({ host, nameLabel, nameDescription = '', ...rest }) {
    const what = 'creating the luksext SR'
    const deviceConfig = buildDeviceConfig(rest)
    const xapi = getXapi(this.#xo, host, what)
    // keys only: a value (the passphrase) never reaches a log line
    this.#log.info('creating a luksext SR', { host: host.id, nameLabel, device: deviceConfig.device, keys: Object.keys(deviceConfig) })
    let ref
    try {
      ref = await xapi.call(
        'SR.create',
        host._xapiRef,
        deviceConfig,
        0, // physical_size: the plugin uses the whole device
        nameLabel,
        nameDescription,
        SR_TYPE,
        'user', // content_type, as @xen-orchestra/xapi Sr.create
        false, // shared: a luksext SR is local to its host
        {} // sm_config
      )
    } catch (error) {
      const e = xapiError(error, what, host)
      this.#log.warn('luksext SR.create failed', { host: host.id, code: e.code, reason: e.message })
      throw e
    }
    // as @xen-orchestra/xapi Sr.create: XO rescans SRs that ask for it
    await xapi.call('SR.add_to_other_config', ref, 'auto-scan', 'true').catch(error => {
      this.#log.warn('could not set other_config:auto-scan on the new SR', { code: error?.code })
    })
    const uuid = await xapi.call('SR.get_uuid', ref)
    this.#log.info('luksext SR created', { host: host.id, sr: uuid })
    return uuid
  }

  async probe({ host }) {
    const what = 'listing the disks for luksext'
    const xapi = getXapi(this.#xo, host, what)
    let results
    try {
      results = await xapi.call('SR.probe_ext', host._xapiRef, {}, SR_TYPE, {})
    } catch (error) {
      throw xapiError(error, what, host)
    }
    const candidates = []
    const srs = []
    for (const r of results ?? []) {
      const cfg = r.configuration ?? {}
      const extra = r.extra_info ?? {}
      if (r.complete && r.sr) {
        srs.push({
          device: cfg.device,
          srUuid: r.sr.uuid ?? cfg.sr_uuid,
          luksUuid: cfg['luks-uuid'],
          name: r.sr.name_label,
          description: r.sr.name_description,
          health: r.sr.health,
          attached: extra.attached === 'true',
          configuration: cfg,
        })
      } else {
        const status = extra.status ?? ''
        candidates.push({ device: cfg.device, status, blank: status.startsWith('blank') })
      }
    }
    return { candidates, srs }
  }
}

// xo-server calls the default export with { xo, staticConfig, getDataDir }
// (packages/xo-server/src/index.mjs registerPlugin).
export default opts => new LuksextPlugin(opts)
