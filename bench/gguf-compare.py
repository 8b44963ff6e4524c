"""Compares two GGUF files tensor by tensor (type and bytes) and their metadata; prints
"N/M" tensors identical (and what differs on stderr). Standard library only."""
import struct
import sys

SIZES = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}


def parse(path):
    d = open(path, 'rb').read()
    o = 0

    def u(fmt):
        nonlocal o
        v = struct.unpack_from('<' + fmt, d, o)
        o += struct.calcsize('<' + fmt)
        return v[0]

    def s():
        nonlocal o
        n = u('Q')
        v = d[o:o + n].decode('utf-8', 'replace')
        o += n
        return v

    def val(t):
        if t == 8:
            return s()
        if t == 9:
            et, n = u('I'), u('Q')
            return [val(et) for _ in range(n)]
        return u(SIZES[t])

    assert d[:4] == b'GGUF', path
    o = 4
    u('I')
    nt, nkv = u('Q'), u('Q')
    kv = {}
    for _ in range(nkv):
        k = s()
        kv[k] = val(u('I'))
    tens = []
    for _ in range(nt):
        name = s()
        dims = [u('Q') for _ in range(u('I'))]
        tens.append((name, dims, u('I'), u('Q')))
    al = kv.get('general.alignment', 32)
    start = (o + al - 1) // al * al
    ends = sorted({t[3] for t in tens}) + [len(d) - start]
    out = {}
    for name, dims, ty, off in tens:
        nxt = min(x for x in ends if x > off)
        out[name] = (dims, ty, d[start + off:start + nxt])
    return kv, out


ka, ta = parse(sys.argv[1])
kb, tb = parse(sys.argv[2])
for k in sorted(set(ka) | set(kb)):
    if ka.get(k) != kb.get(k):
        print('metadata differs:', k, file=sys.stderr)
same = 0
for name, (dims, ty, data) in ta.items():
    if name not in tb:
        print('only in the first:', name, file=sys.stderr)
        continue
    db, tyb, datab = tb[name]
    m = min(len(data), len(datab))
    if ty == tyb and dims == db and data[:m] == datab[:m]:
        same += 1
    else:
        print('differs:', name, ty, tyb, file=sys.stderr)
print(f"{same}/{len(tb)}")
