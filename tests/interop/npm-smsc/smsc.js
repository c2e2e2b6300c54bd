#!/usr/bin/env node
// An SMSC built on the npm `smpp` package (node-smpp), for otpgate's SMPP interoperability
// tests: an independent SMPP 3.4 implementation that encodes and decodes every PDU itself. The
// Rust side starts it through tests/src/npm_smsc.rs and reads what it saw from stdout.
//
// Decoding is the package's, on purpose: this script never decodes GSM 7-bit or UCS-2 itself.
// For submit_sm (and deliver_sm, and the message_payload TLV) the package's `message` filter
// turns `short_message` into `{udh, message}`:
//   - The UDH is split off when esm_class has the UDHI bit (0x40) set: its first octet is the
//     UDH length, and `udh` is the list of information elements, each a Buffer
//     `[IEI, length, data...]`.
//   - The text is decoded by `data_coding & 0x0F`:
//       0 (SMSC default) and 1 (IA5): the package's GSM 03.38 coder (`smpp.encodings.ASCII`,
//         which is GSM despite its name): unpacked, one septet per octet, 0x1B escapes for the
//         extension table (€ [ ] { } ~ ^ \ | and form feed). Octets above 0x7F become spaces.
//         (A national-language shift IE 0x24/0x25 in the UDH selects its Turkish, Spanish or
//         Portuguese table instead.)
//       3: Latin-1; 8: UCS-2 (iconv-lite's UTF-16BE, so surrogate pairs decode too).
//       Anything else (4 binary, ...): left as bytes; we report `text: null`.
// We keep the raw octets for `short_message_hex` by wrapping that filter (the wrapper only
// remembers its input; the decoding is still the package's).
//
// Configuration (environment):
//   SMSC_PORT            TCP port on 127.0.0.1; 0 (default) for any free port
//   SMSC_SYSTEM_ID       the system_id a bind must give (default "otpgate")
//   SMSC_PASSWORD        its password (default "secret12"); never printed
//   SMSC_THROTTLE_FIRST  answer the first N submit_sm with ESME_RTHROTTLED 0x58 (default 0)
//   SMSC_QFULL_FIRST     the next N after those with ESME_RMSGQFUL 0x14 (default 0)
//   SMSC_RECEIPTS        tlv (default): deliver_sm with esm_class 0x04, the receipt text and the
//                        receipted_message_id and message_state TLVs; text: the text only;
//                        none: no receipts
//   SMSC_ID_FORMAT       hex (default): message ids like 0000A1F3 (uppercase, zero-padded),
//                        while the receipt (text and TLV) names it a1f3 (lowercase, no leading
//                        zeros), as some SMSCs do; decimal: ids like 4711001, the same in both
//   SMSC_DELIVERY_DELAY_MS  how long an accepted message spends in this SMSC's own queue
//                        before it reaches the handset, in milliseconds (default 0): its
//                        `handset` event goes out that long after its (last part's)
//                        submit_sm_resp, and each receipt that long plus 20 ms after its part's
//                        submit_sm_resp, as from an operator that accepts at once and delivers
//                        late
//   SMSC_EXIT_ON_STDIN_CLOSE  1 (default): exit when stdin closes, so that a test killed
//                        without its Drop leaves no node behind; 0 to run it by hand in the
//                        background (`node smsc.js </dev/null &`)
//
// Output: one JSON object per line on stdout (see tests/src/npm_smsc.rs for the list); the
// first is {"event":"listening","port":N}. Anything odd is an {"event":"error",...} line: bad
// input never ends the process. It exits on SIGTERM, SIGINT, and (see above) when stdin closes.
'use strict';

const smpp = require('smpp');

const ESME_ROK = 0x00;
const ESME_RINVCMDID = 0x03;
const ESME_RINVBNDSTS = 0x04;
const ESME_RALYBND = 0x05;
const ESME_RINVPASWD = 0x0e;
const ESME_RINVSYSID = 0x0f;
const ESME_RMSGQFUL = 0x14;
const ESME_RTHROTTLED = 0x58;
/// How long after a message reaches the handset (SMSC_DELIVERY_DELAY_MS after the submit_sm_resp)
/// its receipt goes out.
const RECEIPT_DELAY_MS = 20;
const MESSAGE_STATE_DELIVERED = 2;

// === output ===

function emit(event) {
  // Writes to a pipe or a file are synchronous on Linux: every line is out before the next.
  process.stdout.write(JSON.stringify(event) + '\n');
}

function emitError(error, fields) {
  emit(Object.assign({ event: 'error', error: String(error) }, fields || {}));
}

// === configuration ===

function envInt(name, fallback, max = Number.MAX_SAFE_INTEGER) {
  const text = process.env[name];
  if (text === undefined || text === '') return fallback;
  if (!/^\d+$/.test(text) || Number(text) > max) {
    const bound = max < Number.MAX_SAFE_INTEGER ? ` no greater than ${max}` : '';
    emitError(`${name} must be a non-negative integer${bound}, not ${JSON.stringify(text)}`);
    process.exit(2);
  }
  return Number(text);
}

function envChoice(name, choices, fallback) {
  const text = process.env[name];
  if (text === undefined || text === '') return fallback;
  if (!choices.includes(text)) {
    emitError(`${name} must be one of ${choices.join(', ')}, not ${JSON.stringify(text)}`);
    process.exit(2);
  }
  return text;
}

const config = {
  port: envInt('SMSC_PORT', 0),
  systemId: process.env.SMSC_SYSTEM_ID ?? 'otpgate',
  password: process.env.SMSC_PASSWORD ?? 'secret12',
  throttleFirst: envInt('SMSC_THROTTLE_FIRST', 0),
  qfullFirst: envInt('SMSC_QFULL_FIRST', 0),
  receipts: envChoice('SMSC_RECEIPTS', ['tlv', 'text', 'none'], 'tlv'),
  idFormat: envChoice('SMSC_ID_FORMAT', ['hex', 'decimal'], 'hex'),
  // A timer longer than 2^31 - 1 ms would fire at once.
  deliveryDelayMs: envInt('SMSC_DELIVERY_DELAY_MS', 0, 2 ** 31 - 1 - RECEIPT_DELAY_MS),
  exitOnStdinClose: envChoice('SMSC_EXIT_ON_STDIN_CLOSE', ['0', '1'], '1') === '1',
};

// === the raw octets of short_message, beside the package's decoding ===

const messageFilter = smpp.filters.message;
const packageDecode = messageFilter.decode;
messageFilter.decode = function (value, skipUdh) {
  const decoded = packageDecode.call(this, value, skipUdh);
  if (Buffer.isBuffer(value) && decoded && typeof decoded === 'object' && !Buffer.isBuffer(decoded)) {
    Object.defineProperty(decoded, 'raw', { value, enumerable: false });
  }
  return decoded;
};

// A command_length below the 16-octet header leaves the package's reader waiting silently
// (0 is even taken for "nothing read yet"); this makes it an error, which ends that session
// with an error event like any other PDU the package cannot read.
const packageCommandLength = smpp.PDU.commandLength;
smpp.PDU.commandLength = function (stream) {
  const length = packageCommandLength.call(this, stream);
  if (typeof length === 'number' && length < 16) {
    throw new Error(`command_length ${length} is shorter than a PDU header`);
  }
  return length;
};

// === state ===

let nextSessionId = 1;
/// Every connected session's state, by session.
const sessions = new Map();
/// submit_sm from bound transmitters so far (for the throttle and queue-full answers).
let submitsCounted = 0;
let nextMessageNumber = config.idFormat === 'hex' ? 0xa1f3 : 4711001;
/// Parts of concatenated messages still incomplete, by "source|destination|ref|total".
const partial = new Map();
/// Receipts waiting for a receiver or transceiver of their system_id.
const pendingReceipts = [];
/// Round-robin position per system_id.
const receiverTurn = new Map();

function newMessageId() {
  const number = nextMessageNumber++;
  if (config.idFormat === 'hex') {
    const id = number.toString(16).toUpperCase().padStart(8, '0');
    return { id, receiptId: number.toString(16) };
  }
  return { id: String(number), receiptId: String(number) };
}

// === the server ===

const server = smpp.createServer({}, (session) => {
  const state = { id: nextSessionId++, bound: null, systemId: null };
  sessions.set(session, state);
  emit({ event: 'connect', session: state.id, remote_port: session.remotePort ?? null });

  session.on('pdu', (pdu) => {
    try {
      handlePdu(session, state, pdu);
    } catch (error) {
      emitError(`handling ${pdu && pdu.command}: ${error && error.stack ? error.stack : error}`, {
        session: state.id,
      });
    }
  });
  session.on('error', (error) => {
    // The package could not read a PDU (too long, truncated, ...); its reader is stuck after
    // that, and the framing may be lost, so this session ends.
    emitError(`session: ${error && error.message ? error.message : error}`, { session: state.id });
    session.destroy();
  });
  session.on('close', () => {
    sessions.delete(session);
    emit({ event: 'close', session: state.id, system_id: state.systemId });
  });
});

server.on('error', (error) => {
  emitError(`server: ${error && error.message ? error.message : error}`);
  process.exit(1);
});

server.listen(config.port, '127.0.0.1', () => {
  emit({ event: 'listening', port: server.address().port });
});

function handlePdu(session, state, pdu) {
  switch (pdu.command) {
    case 'bind_transceiver':
    case 'bind_transmitter':
    case 'bind_receiver':
      return onBind(session, state, pdu);
    case 'submit_sm':
      return onSubmit(session, state, pdu);
    case 'enquire_link':
      emit({ event: 'enquire_link', session: state.id });
      return session.send(pdu.response());
    case 'enquire_link_resp':
      return;
    case 'unbind':
      emit({ event: 'unbind', session: state.id });
      state.bound = null;
      return session.send(pdu.response(), () => session.close());
    case 'unbind_resp':
      return;
    case 'deliver_sm_resp':
    case 'generic_nack':
      // Answers to our deliver_sm go to their callbacks (see sendReceipt); an unknown sequence
      // number is odd.
      if (!session._callbacks[pdu.sequence_number]) {
        emitError(`${pdu.command} for no deliver_sm we sent`, {
          session: state.id,
          seq: pdu.sequence_number,
          status: pdu.command_status,
        });
      }
      return;
    case 'unknown':
      emitError('unknown command_id', {
        session: state.id,
        command_id: pdu.command_id,
        seq: pdu.sequence_number,
      });
      // The package answers an unknown command with generic_nack ESME_RINVCMDID.
      return session.send(pdu.response());
    default:
      emitError(`unsupported command ${pdu.command}`, {
        session: state.id,
        seq: pdu.sequence_number,
      });
      if (!pdu.isResponse()) {
        session.send(pdu.response({ command_status: ESME_RINVCMDID }));
      }
  }
}

function onBind(session, state, pdu) {
  let status = ESME_ROK;
  if (state.bound) {
    status = ESME_RALYBND;
  } else if (pdu.system_id !== config.systemId) {
    status = ESME_RINVSYSID;
  } else if (pdu.password !== config.password) {
    status = ESME_RINVPASWD;
  }
  emit({
    event: 'bind',
    session: state.id,
    command: pdu.command,
    system_id: pdu.system_id ?? null,
    system_type: pdu.system_type ?? null,
    interface_version: pdu.interface_version ?? null,
    status,
  });
  if (status !== ESME_ROK) {
    session.send(pdu.response({ command_status: status }));
    return;
  }
  state.bound = pdu.command.slice('bind_'.length);
  state.systemId = pdu.system_id;
  session.send(pdu.response({ system_id: 'npm-smsc' }));
  if (state.bound !== 'transmitter') flushPendingReceipts();
}

/// The concatenation info of a submit: its 8- or 16-bit reference UDH IE, or the SAR TLVs.
function concatInfo(sm, pdu) {
  for (const ie of (sm && Array.isArray(sm.udh) ? sm.udh : [])) {
    if (ie[0] === 0x00 && ie[1] === 3 && ie.length >= 5) {
      return { kind: 'udh', ref: ie[2], total: ie[3], seq: ie[4] };
    }
    if (ie[0] === 0x08 && ie[1] === 4 && ie.length >= 6) {
      return { kind: 'udh', ref: ie.readUInt16BE(2), total: ie[4], seq: ie[5] };
    }
  }
  if (pdu.sar_msg_ref_num !== undefined && pdu.sar_total_segments !== undefined) {
    return {
      kind: 'sar',
      ref: pdu.sar_msg_ref_num,
      total: pdu.sar_total_segments,
      seq: pdu.sar_segment_seqnum ?? 0,
    };
  }
  return null;
}

function onSubmit(session, state, pdu) {
  let status = ESME_ROK;
  if (state.bound !== 'transmitter' && state.bound !== 'transceiver') {
    status = ESME_RINVBNDSTS;
  } else {
    submitsCounted += 1;
    if (submitsCounted <= config.throttleFirst) {
      status = ESME_RTHROTTLED;
    } else if (submitsCounted <= config.throttleFirst + config.qfullFirst) {
      status = ESME_RMSGQFUL;
    }
  }

  // The package's decoding: short_message, or message_payload when short_message is empty.
  let sm = pdu.short_message;
  const payload = pdu.message_payload;
  const smEmpty = !sm || (sm.message !== undefined && sm.message.length === 0 && !sm.udh);
  if (smEmpty && payload !== undefined) sm = payload;
  const raw = sm && Buffer.isBuffer(sm.raw) ? sm.raw : Buffer.isBuffer(sm) ? sm : Buffer.alloc(0);
  const text = sm && typeof sm.message === 'string' ? sm.message : null;
  const concat = concatInfo(sm, pdu);
  if (text === null) {
    emitError('short_message not decoded as text', {
      session: state.id,
      seq: pdu.sequence_number,
      data_coding: pdu.data_coding ?? null,
    });
  }
  if (concat && (concat.total === 0 || concat.seq === 0 || concat.seq > concat.total)) {
    emitError('bad concatenation numbers', { session: state.id, seq: pdu.sequence_number, concat });
  }

  const ids = status === ESME_ROK ? newMessageId() : null;
  emit({
    event: 'submit',
    session: state.id,
    seq: pdu.sequence_number,
    status,
    message_id: ids ? ids.id : null,
    service_type: pdu.service_type ?? null,
    source_addr: pdu.source_addr ?? null,
    source_addr_ton: pdu.source_addr_ton ?? null,
    source_addr_npi: pdu.source_addr_npi ?? null,
    destination_addr: pdu.destination_addr ?? null,
    dest_addr_ton: pdu.dest_addr_ton ?? null,
    dest_addr_npi: pdu.dest_addr_npi ?? null,
    data_coding: pdu.data_coding ?? null,
    esm_class: pdu.esm_class ?? null,
    registered_delivery: pdu.registered_delivery ?? null,
    short_message_hex: raw.toString('hex'),
    in_message_payload: sm === payload && payload !== undefined,
    udh: concat && concat.kind === 'udh' ? { ref: concat.ref, total: concat.total, seq: concat.seq } : null,
    sar: concat && concat.kind === 'sar' ? { ref: concat.ref, total: concat.total, seq: concat.seq } : null,
    text,
  });

  if (status !== ESME_ROK) {
    session.send(pdu.response({ command_status: status }));
    return;
  }
  const wantsReceipt = ((pdu.registered_delivery ?? 0) & 0x03) === 0x01;
  const submitted = new Date();
  let message = null;
  session.send(pdu.response({ message_id: ids.id }), () => {
    // The message (once whole) waits in this SMSC's queue, then reaches the handset; the
    // receipts follow.
    if (message) {
      const handset = Object.assign({}, message, { event: 'handset' });
      setTimeout(() => emit(handset), config.deliveryDelayMs);
    }
    if (wantsReceipt && config.receipts !== 'none') {
      setTimeout(() => {
        try {
          queueReceipt(state.systemId, pdu, ids, text, submitted);
        } catch (error) {
          emitError(`receipt: ${error && error.stack ? error.stack : error}`);
        }
      }, config.deliveryDelayMs + RECEIPT_DELAY_MS);
    }
  });
  message = collectMessage(pdu, concat, text, ids.id);
}

/// Emits a `message` event once every part of a message is in (at once for an unsplit one), and
/// returns its fields (for the `handset` event); returns null while parts are missing.
function collectMessage(pdu, concat, text, messageId) {
  const base = {
    event: 'message',
    source_addr: pdu.source_addr ?? null,
    destination_addr: pdu.destination_addr ?? null,
  };
  if (!concat || concat.total <= 1) {
    const message = Object.assign(base, { text, parts: 1, data_coding: pdu.data_coding ?? null, message_ids: [messageId] });
    emit(message);
    return message;
  }
  const key = [pdu.source_addr, pdu.destination_addr, concat.ref, concat.total].join('|');
  let entry = partial.get(key);
  if (!entry) {
    entry = { parts: new Map(), dataCodings: new Set() };
    partial.set(key, entry);
  }
  if (entry.parts.has(concat.seq)) {
    emitError('duplicate part of a concatenated message; the later one is kept', {
      destination_addr: pdu.destination_addr ?? null,
      udh: { ref: concat.ref, total: concat.total, seq: concat.seq },
    });
  }
  entry.parts.set(concat.seq, { text, messageId });
  entry.dataCodings.add(pdu.data_coding ?? null);
  if (entry.parts.size < concat.total) return null;
  partial.delete(key);
  const seqs = [...entry.parts.keys()].sort((a, b) => a - b);
  const codings = [...entry.dataCodings];
  if (codings.length > 1) {
    emitError('parts of one message differ in data_coding', { destination_addr: base.destination_addr, data_codings: codings });
  }
  const message = Object.assign(base, {
    text: seqs.map((seq) => entry.parts.get(seq).text ?? '').join(''),
    parts: seqs.length,
    data_coding: codings[0],
    ref: concat.ref,
    message_ids: seqs.map((seq) => entry.parts.get(seq).messageId),
  });
  emit(message);
  return message;
}

// === receipts ===

function receiptDate(date) {
  const two = (n) => String(n).padStart(2, '0');
  return (
    two(date.getUTCFullYear() % 100) +
    two(date.getUTCMonth() + 1) +
    two(date.getUTCDate()) +
    two(date.getUTCHours()) +
    two(date.getUTCMinutes())
  );
}

function queueReceipt(systemId, submit, ids, text, submitted) {
  const now = new Date();
  // The first 20 characters of the message, as many SMSCs quote it, kept to the characters
  // whose GSM 03.38 code is their ASCII code (the receipt's octets are ASCII, with data_coding
  // 0); any other becomes '.'.
  const quoted = (text ?? '').slice(0, 20).replace(/[^ !"#%&'()*+,\-./0-9:;<=>?A-Za-z]/g, '.');
  const receiptText =
    `id:${ids.receiptId} sub:001 dlvrd:001 submit date:${receiptDate(submitted)} ` +
    `done date:${receiptDate(now)} stat:DELIVRD err:000 text:${quoted}`;
  const options = {
    service_type: '',
    source_addr_ton: submit.dest_addr_ton ?? 0,
    source_addr_npi: submit.dest_addr_npi ?? 0,
    source_addr: submit.destination_addr ?? '',
    dest_addr_ton: submit.source_addr_ton ?? 0,
    dest_addr_npi: submit.source_addr_npi ?? 0,
    destination_addr: submit.source_addr ?? '',
    esm_class: 0x04,
    data_coding: 0,
    // A Buffer is sent as it is: plain ASCII, which is the same octets in GSM 03.38 here.
    short_message: Buffer.from(receiptText, 'ascii'),
  };
  if (config.receipts === 'tlv') {
    options.receipted_message_id = ids.receiptId;
    options.message_state = MESSAGE_STATE_DELIVERED;
  }
  const receipt = { systemId, messageId: ids.id, receiptId: ids.receiptId, options };
  pendingReceipts.push(receipt);
  flushPendingReceipts();
  if (pendingReceipts.includes(receipt)) {
    emit({ event: 'receipt_queued', message_id: ids.id, reason: 'no receiver or transceiver bound' });
  }
}

/// Sends every pending receipt that has a receiving session now; the others wait for a bind.
function flushPendingReceipts() {
  for (const receipt of pendingReceipts.splice(0)) {
    const session = nextReceiver(receipt.systemId);
    if (session) {
      sendReceipt(session, receipt);
    } else {
      pendingReceipts.push(receipt);
    }
  }
}

/// The next receiver or transceiver session of this system_id, round-robin.
function nextReceiver(systemId) {
  const receivers = [...sessions.entries()].filter(
    ([session, state]) =>
      state.systemId === systemId &&
      (state.bound === 'receiver' || state.bound === 'transceiver') &&
      !session.closed &&
      session.socket.writable,
  );
  if (receivers.length === 0) return null;
  const turn = receiverTurn.get(systemId) ?? 0;
  receiverTurn.set(systemId, turn + 1);
  return receivers[turn % receivers.length][0];
}

function sendReceipt(session, receipt) {
  const state = sessions.get(session);
  const sent = session.deliver_sm(
    receipt.options,
    (response) => {
      emit({
        event: 'receipt_acked',
        session: state ? state.id : null,
        message_id: receipt.messageId,
        command: response.command,
        status: response.command_status,
      });
    },
    (pdu) => {
      emit({
        event: 'receipt_sent',
        session: state ? state.id : null,
        seq: pdu.sequence_number,
        message_id: receipt.messageId,
        receipt_id: receipt.receiptId,
        receipts: config.receipts,
      });
    },
    () => {
      emitError('receipt could not be written', { message_id: receipt.messageId });
    },
  );
  if (!sent) {
    // Not written (the failure callback said so): it waits for the next bind.
    pendingReceipts.push(receipt);
  }
}

// === lifetime ===

function shutdown(reason) {
  emit({ event: 'exit', reason });
  process.exit(0);
}

process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (config.exitOnStdinClose) {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}
process.on('uncaughtException', (error) => {
  emitError(`uncaught: ${error && error.stack ? error.stack : error}`);
});
