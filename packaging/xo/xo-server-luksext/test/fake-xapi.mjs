// A fake XAPI on 127.0.0.1 speaking XenAPI JSON-RPC (POST /jsonrpc), with
// just what the xen-api client needs to connect (session.login_with_password,
// pool.get_all_records, system.listMethods; xen-api index.mjs _sessionOpen)
// and the calls the plugin makes. It records every call with its params
// (session first, as XAPI receives them). What real XAPI does differently:
// SR.create runs the SM plugin (here a scripted result or failure), refs
// are opaque random strings, and it also speaks XML-RPC (the client tries
// JSON-RPC first and only falls back on a text/xml answer).
import { createServer } from 'node:http'

export async function startFakeXapi({ hosts = { 'OpaqueRef:host-1': 'host-1-uuid' } } = {}) {
  const calls = []
  const srs = {}
  const state = { createFailure: undefined, probeResults: [] }
  let n = 0

  function handle(method, params) {
    const [, ...args] = params
    switch (method) {
      case 'session.login_with_password':
        return 'OpaqueRef:session-1'
      case 'session.logout':
        return ''
      case 'pool.get_all_records':
        return { 'OpaqueRef:pool-1': { uuid: 'pool-1-uuid', name_label: 'pool', master: Object.keys(hosts)[0], other_config: {} } }
      case 'system.listMethods':
        return ['pool.get_all_records', 'host.get_all_records', 'SR.get_all_records']
      case 'SR.create': {
        const [host] = args
        if (!(host in hosts)) throw { message: 'HANDLE_INVALID', data: ['host', host] }
        if (state.createFailure !== undefined) throw state.createFailure
        const ref = `OpaqueRef:sr-${++n}`
        srs[ref] = { uuid: `00000000-0000-4000-8000-00000000000${n}`, other_config: {} }
        return ref
      }
      case 'SR.add_to_other_config': {
        const [ref, k, v] = args
        if (!(ref in srs)) throw { message: 'HANDLE_INVALID', data: ['SR', ref] }
        srs[ref].other_config[k] = v
        return ''
      }
      case 'SR.get_uuid': {
        const [ref] = args
        if (!(ref in srs)) throw { message: 'HANDLE_INVALID', data: ['SR', ref] }
        return srs[ref].uuid
      }
      case 'SR.probe_ext': {
        const [host] = args
        if (!(host in hosts)) throw { message: 'HANDLE_INVALID', data: ['host', host] }
        return state.probeResults
      }
      default:
        throw { message: 'MESSAGE_METHOD_UNKNOWN', data: [method] }
    }
  }

  const server = createServer((req, res) => {
    let body = ''
    req.on('data', c => (body += c))
    req.on('end', () => {
      if (req.method !== 'POST' || req.url !== '/jsonrpc') {
        res.writeHead(404).end()
        return
      }
      const { id, method, params = [] } = JSON.parse(body)
      calls.push({ method, params })
      let out
      try {
        out = { jsonrpc: '2.0', id, result: handle(method, params) }
      } catch (e) {
        out = { jsonrpc: '2.0', id, error: { code: 1, message: e.message, data: e.data } }
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(out))
    })
  })
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address()
  return {
    url: `http://127.0.0.1:${port}`,
    calls,
    srs,
    state,
    callsOf: method => calls.filter(c => c.method === method),
    close: () =>
      new Promise(resolve => {
        server.closeAllConnections?.()
        server.close(resolve)
      }),
  }
}
