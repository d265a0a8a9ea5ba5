// The plugin against a fake XAPI on 127.0.0.1, reached through the real
// xen-api client (the one xo-server's Xapi class extends). The fake xo
// below does what xo-server does around an API method
// (packages/xo-server/src/xo-mixins/api.mjs): refuse a second method of
// the same name, check required params, resolve `host` to the XO object
// (or fail "no such host"), then call the method.
import assert from 'node:assert/strict'
import { after, before, beforeEach, test } from 'node:test'
import { inspect } from 'node:util'
import { Xapi } from 'xen-api'

import factory, { buildDeviceConfig } from '../index.mjs'
import { startFakeXapi } from './fake-xapi.mjs'

const CANARY = 'CANARY-recovery-5e1f9a'

function makeXo(xapiByPool) {
  const methods = {}
  const objects = {
    'host-1-uuid': { id: 'host-1-uuid', type: 'host', name_label: 'xcp1', $pool: 'pool-1', _xapiRef: 'OpaqueRef:host-1' },
    // known to XO but gone from XAPI (stale _xapiRef)
    'host-9-uuid': { id: 'host-9-uuid', type: 'host', name_label: 'xcp9', $pool: 'pool-1', _xapiRef: 'OpaqueRef:host-9' },
    // on a pool whose XAPI no longer answers
    'host-2-uuid': { id: 'host-2-uuid', type: 'host', name_label: 'xcp2', $pool: 'pool-2', _xapiRef: 'OpaqueRef:host-1' },
  }
  return {
    methods,
    addApiMethod(name, fn, opts) {
      if (name in methods) throw new Error(`API method ${name} already exists`)
      methods[name] = { fn, ...opts }
      return () => delete methods[name]
    },
    getXapi(host) {
      const xapi = xapiByPool[host.$pool]
      if (xapi === undefined) throw new Error(`no connection found for object ${host.id}`)
      return xapi
    },
    async call(name, params) {
      const m = methods[name]
      if (m === undefined) throw new Error(`method not found: ${name}`)
      for (const [k, spec] of Object.entries(m.params)) {
        if (!spec.optional && params[k] === undefined) throw new Error(`invalid parameters: missing ${k}`)
      }
      const resolved = { ...params }
      for (const [k, [param, type]] of Object.entries(m.resolve)) {
        const obj = objects[params[param]]
        if (obj === undefined || obj.type !== type) throw new Error(`no such ${type} ${params[param]}`)
        resolved[k] = obj
      }
      return m.fn.call(this, resolved)
    },
  }
}

let fake, dead, xapi, deadXapi, xo, plugin, logs
const captured = () => logs.map(l => inspect(l, { depth: 10 })).join('\n')

before(async () => {
  fake = await startFakeXapi()
  dead = await startFakeXapi()
  const connect = async url => {
    const x = new Xapi({ url, auth: { user: 'root', password: 'x' }, allowUnauthorized: true, callTimeout: 5e3, watchEvents: false })
    // xo-server watches events; the fake has no event.from, and the client
    // would retry it every minute
    await x.connect()
    return x
  }
  xapi = await connect(fake.url)
  deadXapi = await connect(dead.url)
  await dead.close() // XAPI of pool-2 goes away after XO connected to it
})

after(async () => {
  await xapi.disconnect()
  await deadXapi.disconnect().catch(() => {})
  await fake.close()
})

beforeEach(async () => {
  logs = []
  const record = level => (msg, data) => logs.push({ level, msg, data })
  xo = makeXo({ 'pool-1': xapi, 'pool-2': deadXapi })
  plugin = factory({ xo, staticConfig: {}, getDataDir: async () => '/nonexistent', logger: { debug: record('debug'), info: record('info'), warn: record('warn'), error: record('error') } })
  await plugin.load()
  fake.calls.length = 0
  for (const k of Object.keys(fake.srs)) delete fake.srs[k]
  fake.state.createFailure = undefined
})

const base = { host: 'host-1-uuid', nameLabel: 'Encrypted local SR', nameDescription: 'disk 2', device: '/dev/disk/by-id/ata-X' }

test('load registers sr.createLuksext and sr.probeLuksext the way sr.mjs declares createExt', () => {
  for (const name of ['sr.createLuksext', 'sr.probeLuksext']) {
    const m = xo.methods[name]
    assert.ok(m, name)
    assert.deepEqual(m.resolve, { host: ['host', 'host', 'administrate'] })
    assert.deepEqual(m.params.host, { type: 'string', description: m.params.host.description })
  }
  const p = xo.methods['sr.createLuksext'].params
  for (const k of ['host', 'nameLabel', 'device']) assert.equal(p[k].optional, undefined, k)
  for (const k of ['recoveryPassword', 'recoveryFallback', 'tpm2PcrIds', 'tpm2PcrBank', 'tangUrl', 'tangThp', 'tangTrust', 'sssThreshold', 'force']) {
    assert.equal(p[k].optional, true, k)
  }
  // every secret's name matches XO's obfuscation pattern
  assert.match('recoveryPassword', /password/i)
})

test('createLuksext: the exact XAPI SR.create call, then auto-scan, returns the SR uuid', async () => {
  const uuid = await xo.call('sr.createLuksext', {
    ...base,
    recoveryPassword: CANARY,
    recoveryFallback: true,
    tpm2PcrIds: '0, 7',
    tpm2PcrBank: 'sha256',
    tangUrl: 'http://tang1:7500,https://tang2',
    tangThp: 'thpA,thpB',
    sssThreshold: 2,
    force: true,
  })
  assert.match(uuid, /^00000000-0000-4000-8000-0000000000\d\d$/)
  const creates = fake.callsOf('SR.create')
  assert.equal(creates.length, 1)
  assert.deepEqual(creates[0].params, [
    'OpaqueRef:session-1',
    'OpaqueRef:host-1',
    {
      device: '/dev/disk/by-id/ata-X',
      'recovery-password': CANARY,
      'recovery-fallback': 'true',
      'tpm2-pcr-ids': '0,7',
      'tpm2-pcr-bank': 'sha256',
      'tang-url': 'http://tang1:7500,https://tang2',
      'tang-thp': 'thpA,thpB',
      'sss-threshold': '2',
      force: 'true',
    },
    0,
    'Encrypted local SR',
    'disk 2',
    'luksext',
    'user',
    false,
    {},
  ])
  assert.deepEqual(Object.values(fake.srs), [{ uuid, other_config: { 'auto-scan': 'true' } }])
  assert.ok(!captured().includes(CANARY), 'the passphrase is in the plugin log:\n' + captured())
  assert.match(captured(), /creating a luksext SR/)
})

test('createLuksext: only the keys given reach device_config', async () => {
  await xo.call('sr.createLuksext', { ...base, nameDescription: undefined })
  const [c] = fake.callsOf('SR.create')
  assert.deepEqual(c.params[2], { device: '/dev/disk/by-id/ata-X' })
  assert.equal(c.params[5], '')
})

test('createLuksext: invalid parameters are refused before XAPI is called', async () => {
  const cases = [
    [{ device: 'sdb' }, /device-config:device must be an absolute path/],
    [{ device: ' ' }, /device-config:device is required/],
    [{ recoveryPassword: 'short' }, /recovery-password must be at least 8/],
    [{ recoveryFallback: true }, /recovery-fallback needs a recovery-password/],
    [{ tpm2PcrIds: '7,24' }, /tpm2-pcr-ids must be a comma-separated list of PCR numbers 0-23/],
    [{ tpm2PcrBank: 'sha1' }, /tpm2-pcr-bank only makes sense with tpm2-pcr-ids/],
    [{ tpm2PcrIds: '7', tpm2PcrBank: 'md5' }, /tpm2-pcr-bank must be sha256 or sha1/],
    [{ tangUrl: 'http://t' }, /tang-thp is required with tang-url/],
    [{ tangUrl: 'http://t', tangThp: 'a,b' }, /has 2 thumbprint\(s\) for 1 tang-url/],
    [{ tangUrl: 'ftp://t', tangTrust: true }, /tang-url "ftp:\/\/t" is not an http\(s\) URL/],
    [{ sssThreshold: 2 }, /sss-threshold must be a number from 1 to 1/],
  ]
  for (const [p, re] of cases) {
    await assert.rejects(xo.call('sr.createLuksext', { ...base, ...p }), re, JSON.stringify(p))
  }
  await assert.rejects(xo.call('sr.createLuksext', { host: 'host-1-uuid', nameLabel: 'x' }), /missing device/)
  assert.equal(fake.callsOf('SR.create').length, 0, 'nothing reached XAPI')
})

test('createLuksext: SR_BACKEND_FAILURE reaches the user with its name and sentence, and no passphrase', async () => {
  const sentence = 'device-config:device /dev/sdb holds an ext4 filesystem; set force=true to erase it (all data on it is lost)'
  fake.state.createFailure = { message: 'SR_BACKEND_FAILURE', data: ['Invalid_configuration', sentence, ''] }
  const err = await xo.call('sr.createLuksext', { ...base, recoveryPassword: CANARY }).then(
    () => assert.fail('SR.create should fail'),
    e => e
  )
  assert.equal(err.code, 'SR_BACKEND_FAILURE')
  assert.deepEqual(err.params, ['Invalid_configuration', sentence, ''])
  assert.equal(err.message, `creating the luksext SR failed on host xcp1: Invalid_configuration: ${sentence}`)
  const everything = [inspect(err, { depth: 10, showHidden: true }), JSON.stringify(err), err.stack, captured()].join('\n')
  assert.ok(!everything.includes(CANARY), 'the passphrase leaked:\n' + everything)
  assert.equal(Object.keys(fake.srs).length, 0, 'no SR object left')
})

test('createLuksext: a host XO knows but XAPI does not gives a readable error', async () => {
  await assert.rejects(xo.call('sr.createLuksext', { ...base, host: 'host-9-uuid' }), {
    code: 'HANDLE_INVALID',
    message: /host xcp9 is not known to its pool any more \(HANDLE_INVALID\)/,
  })
})

test('createLuksext and probeLuksext: an unknown host id is refused by resolve', async () => {
  await assert.rejects(xo.call('sr.createLuksext', { ...base, host: 'nope' }), /no such host nope/)
  await assert.rejects(xo.call('sr.probeLuksext', { host: 'nope' }), /no such host nope/)
  assert.equal(fake.calls.length, 0)
})

test('createLuksext: XAPI unreachable gives a readable error, without the passphrase', async () => {
  const err = await xo.call('sr.createLuksext', { ...base, host: 'host-2-uuid', recoveryPassword: CANARY }).then(
    () => assert.fail('should fail'),
    e => e
  )
  assert.match(err.message, /^creating the luksext SR: cannot reach the XAPI of host xcp2 \(ECONNREFUSED\)$/)
  assert.ok(![inspect(err, { depth: 10, showHidden: true }), captured()].join('\n').includes(CANARY))
})

test('probeLuksext: candidates and existing luksext disks from SR.probe_ext', async () => {
  fake.state.probeResults = [
    { configuration: { device: '/dev/disk/by-id/ata-A' }, complete: false, extra_info: { status: 'blank: SR.create will use it' } },
    { configuration: { device: '/dev/disk/by-id/ata-B' }, complete: false, extra_info: { status: 'holds ext4: SR.create needs force=true and erases it' } },
    {
      configuration: { device: '/dev/disk/by-id/ata-C', sr_uuid: '6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11', 'luks-uuid': 'l-1' },
      complete: true,
      sr: { uuid: '6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11', name_label: 'Encrypted local SR', name_description: '', health: 'healthy' },
      extra_info: { attached: 'true', luks_version: '2' },
    },
  ]
  const r = await xo.call('sr.probeLuksext', { host: 'host-1-uuid' })
  assert.deepEqual(fake.callsOf('SR.probe_ext')[0].params, ['OpaqueRef:session-1', 'OpaqueRef:host-1', {}, 'luksext', {}])
  assert.deepEqual(r.candidates, [
    { device: '/dev/disk/by-id/ata-A', status: 'blank: SR.create will use it', blank: true },
    { device: '/dev/disk/by-id/ata-B', status: 'holds ext4: SR.create needs force=true and erases it', blank: false },
  ])
  assert.equal(r.srs.length, 1)
  assert.equal(r.srs[0].srUuid, '6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11')
  assert.equal(r.srs[0].attached, true)
  assert.equal(r.srs[0].device, '/dev/disk/by-id/ata-C')
})

test('loaded into an xo-server that already has sr.createLuksext: logs, skips, does not throw', async () => {
  const xo2 = makeXo({ 'pool-1': xapi })
  const upstream = async () => 'upstream'
  xo2.addApiMethod('sr.createLuksext', upstream, { params: {}, resolve: {} })
  const warnings = []
  const p2 = factory({ xo: xo2, logger: { info() {}, debug() {}, error() {}, warn: m => warnings.push(m) } })
  await p2.load()
  assert.equal(xo2.methods['sr.createLuksext'].fn, upstream, 'the existing method is kept')
  assert.ok(xo2.methods['sr.probeLuksext'], 'the other method is still added')
  assert.deepEqual(warnings, ['not registering sr.createLuksext: API method sr.createLuksext already exists'])
  await p2.unload()
  assert.equal(xo2.methods['sr.createLuksext'].fn, upstream, 'unload removes only what the plugin added')
  assert.equal(xo2.methods['sr.probeLuksext'], undefined)
})

test('buildDeviceConfig keeps tang-trust and a lone TPM policy', () => {
  assert.deepEqual(buildDeviceConfig({ device: '/dev/sdb', tangUrl: 'http://t:7500', tangTrust: true }), {
    device: '/dev/sdb',
    'tang-url': 'http://t:7500',
    'tang-trust': 'true',
  })
})
