package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// A light simulated agent reads its SyncUpdates stream without connect's
// client: it speaks the Connect protocol's server-streaming framing itself
// (https://connectrpc.com/docs/protocol/#streaming-rpcs: each message is a
// 5-byte envelope, flags then a big-endian length, flag 1 = compressed, flag 2 =
// the end-of-stream JSON) and skims each message's protobuf as it is
// decompressed, keeping only what the watch needs. connect's client buffers every
// whole message, compressed and decompressed; with 5,000 agents each receiving a
// 4,999-peer netmap (1.2 MB) at once that outgrew the machine's 24 GB. Here an
// agent holds its bufio and gzip state, and each peer entry in turn.

// maxSkimmed is the largest field a light agent reads whole (a peer entry, a
// header); larger ones are skipped.
const maxSkimmed = 64 << 10

// errUnimplemented is what streamUpdatesRaw returns when the controller does not
// serve SyncUpdates.
var errUnimplemented = connect.NewError(connect.CodeUnimplemented, errors.New("SyncUpdates is not served"))

// streamUpdatesRaw is streamUpdates for a light agent.
func (f *fleet) streamUpdatesRaw(ctx context.Context, a *simAgent, req *segmeshv1.SyncRequest) (bool, error) {
	body, err := proto.Marshal(req)
	if err != nil {
		return false, err
	}
	env := make([]byte, 5, 5+len(body))
	binary.BigEndian.PutUint32(env[1:], uint32(len(body)))
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url+segmeshv1connect.AgentServiceSyncUpdatesProcedure, bytes.NewReader(append(env, body...)))
	if err != nil {
		return false, err
	}
	hr.Header.Set("Content-Type", "application/connect+proto")
	hr.Header.Set("Connect-Protocol-Version", "1")
	hr.Header.Set("Connect-Accept-Encoding", "gzip")
	resp, err := a.hc.Do(hr)
	if err != nil {
		return false, fmt.Errorf("opening the netmap stream: %w", err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return false, errUnimplemented
	case resp.StatusCode != http.StatusOK:
		return false, fmt.Errorf("opening the netmap stream: HTTP %s", resp.Status)
	}
	gzipped := resp.Header.Get("Connect-Content-Encoding") == "gzip"
	br := bufio.NewReaderSize(resp.Body, 16<<10)
	var gz *gzip.Reader
	var mbr *bufio.Reader
	received := false
	var heldHash string
	var held *segmeshv1.Netmap
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return received, errors.New("stream closed by the controller")
			}
			return received, fmt.Errorf("reading the netmap stream: %w", err)
		}
		n := int64(binary.BigEndian.Uint32(hdr[1:]))
		msg := io.LimitReader(br, n)
		var r io.Reader = msg
		if hdr[0]&1 != 0 {
			if !gzipped {
				return received, errors.New("a compressed message on a stream without Connect-Content-Encoding")
			}
			if gz == nil {
				if gz, err = gzip.NewReader(msg); err != nil {
					return received, fmt.Errorf("decompressing a netmap update: %w", err)
				}
			} else if err := gz.Reset(msg); err != nil {
				return received, fmt.Errorf("decompressing a netmap update: %w", err)
			}
			r = gz
		}
		if hdr[0]&2 != 0 {
			return received, endOfStream(r)
		}
		if mbr == nil {
			mbr = bufio.NewReaderSize(r, 16<<10)
		} else {
			mbr.Reset(r)
		}
		u, fullSize, err := skimUpdate(mbr)
		if err != nil {
			return received, err
		}
		if u.GetFull() != nil {
			a.size.Store(fullSize)
		}
		if _, err := io.Copy(io.Discard, msg); err != nil { // what the skim left (gzip trailer)
			return received, fmt.Errorf("reading the netmap stream: %w", err)
		}
		received = true
		if err := f.onUpdate(ctx, a, u, &heldHash, &held); err != nil {
			return received, err
		}
	}
}

// endOfStream returns the error the Connect end-of-stream message r carries.
func endOfStream(r io.Reader) error {
	var end struct {
		Error *struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.NewDecoder(r).Decode(&end); err != nil {
		return fmt.Errorf("reading the end of the netmap stream: %w", err)
	}
	if end.Error == nil {
		return errors.New("stream closed by the controller")
	}
	var code connect.Code
	if err := code.UnmarshalText([]byte(end.Error.Code)); err != nil {
		code = connect.CodeUnknown
	}
	return connect.NewError(code, errors.New(end.Error.Message))
}

// pbReader reads the fields of one protobuf message of n bytes from br.
type pbReader struct {
	br  *bufio.Reader
	n   int64
	buf []byte
}

func (p *pbReader) ReadByte() (byte, error) {
	if p.n <= 0 {
		return 0, io.ErrUnexpectedEOF
	}
	b, err := p.br.ReadByte()
	if err == nil {
		p.n--
	}
	return b, err
}

// next reads the next field's tag; ok is false at the end of the message.
func (p *pbReader) next() (num protowire.Number, typ protowire.Type, ok bool, err error) {
	if p.n == 0 {
		return 0, 0, false, nil
	}
	v, err := binary.ReadUvarint(p)
	if err != nil {
		return 0, 0, false, err
	}
	num, typ = protowire.DecodeTag(v)
	return num, typ, true, nil
}

func (p *pbReader) varint() (uint64, error) { return binary.ReadUvarint(p) }

// length reads a length-delimited field's length.
func (p *pbReader) length() (int64, error) {
	v, err := binary.ReadUvarint(p)
	if err == nil && v > uint64(p.n) {
		err = fmt.Errorf("field of %d bytes in %d left", v, p.n)
	}
	return int64(v), err
}

// bytes reads a length-delimited field whole into p's buffer (valid until the
// next call); a field longer than maxSkimmed is skipped and returns nil.
func (p *pbReader) bytes() ([]byte, error) {
	n, err := p.length()
	if err != nil {
		return nil, err
	}
	if n > maxSkimmed {
		return nil, p.discard(n)
	}
	if int64(cap(p.buf)) < n {
		p.buf = make([]byte, n)
	}
	b := p.buf[:n]
	if _, err := io.ReadFull(p.br, b); err != nil {
		return nil, err
	}
	p.n -= n
	return b, nil
}

func (p *pbReader) discard(n int64) error {
	if _, err := p.br.Discard(int(n)); err != nil {
		return err
	}
	p.n -= n
	return nil
}

// skip skips the value of a field of wire type typ.
func (p *pbReader) skip(typ protowire.Type) error {
	switch typ {
	case protowire.VarintType:
		_, err := p.varint()
		return err
	case protowire.Fixed64Type:
		return p.discard(8)
	case protowire.Fixed32Type:
		return p.discard(4)
	case protowire.BytesType:
		n, err := p.length()
		if err != nil {
			return err
		}
		return p.discard(n)
	}
	return fmt.Errorf("unsupported wire type %d", typ)
}

// skimUpdate reads one NetmapUpdate from br (to its end) and returns its summary
// (a full netmap as decodeNetmapSummary fills it, a delta as decodeDeltaSummary
// does) and the encoded size of a full netmap.
func skimUpdate(br *bufio.Reader) (*segmeshv1.NetmapUpdate, int64, error) {
	top := &pbReader{br: br, n: 1 << 62}
	u := &segmeshv1.NetmapUpdate{}
	var size int64
	for {
		num, typ, ok, err := top.next()
		if errors.Is(err, io.EOF) || err == nil && !ok { // the message's end
			return u, size, nil
		}
		if err != nil {
			return nil, 0, fmt.Errorf("skimming a netmap update: %w", err)
		}
		if typ != protowire.BytesType || num != 1 && num != 2 {
			if err := top.skip(typ); err != nil {
				return nil, 0, fmt.Errorf("skimming a netmap update: %w", err)
			}
			continue
		}
		n, err := top.length()
		if err != nil {
			return nil, 0, fmt.Errorf("skimming a netmap update: %w", err)
		}
		sub := &pbReader{br: br, n: n}
		if num == 1 {
			size = n
			nm := &segmeshv1.Netmap{}
			u.Update = &segmeshv1.NetmapUpdate_Full{Full: nm}
			err = skimNetmap(sub, nm)
		} else {
			d := &segmeshv1.NetmapDelta{}
			u.Update = &segmeshv1.NetmapUpdate_Delta{Delta: d}
			err = skimDelta(sub, d)
		}
		if err != nil {
			return nil, 0, fmt.Errorf("skimming a netmap update: %w", err)
		}
		top.n -= n
	}
}

// skimNetmap is decodeNetmapSummary reading from p.
func skimNetmap(p *pbReader, nm *segmeshv1.Netmap) error {
	for {
		num, typ, ok, err := p.next()
		if err != nil || !ok {
			return err
		}
		var b []byte
		switch {
		case num == 1 && typ == protowire.VarintType:
			nm.PolicyRevision, err = p.varint()
		case (num == 2 || num == 3 || num == 7) && typ == protowire.BytesType:
			if b, err = p.bytes(); err != nil || b == nil {
				break
			}
			switch num {
			case 2:
				nm.Self = &segmeshv1.Node{}
				err = nameEndpoint(b, 1, 5, &nm.Self.Name, &nm.Self.Endpoint)
			case 3:
				peer := &segmeshv1.Peer{}
				nm.Peers = append(nm.Peers, peer)
				err = nameEndpoint(b, 1, 3, &peer.Name, &peer.Endpoint)
			case 7:
				nm.Hash = string(b)
			}
		default:
			err = p.skip(typ)
		}
		if err != nil {
			return err
		}
	}
}

// skimDelta is decodeDeltaSummary reading from p.
func skimDelta(p *pbReader, d *segmeshv1.NetmapDelta) error {
	for {
		num, typ, ok, err := p.next()
		if err != nil || !ok {
			return err
		}
		var b []byte
		switch {
		case num == 3 && typ == protowire.VarintType:
			d.PolicyRevision, err = p.varint()
		case num <= 6 && num != 3 && typ == protowire.BytesType:
			if b, err = p.bytes(); err != nil || b == nil {
				break
			}
			// The fields the summary keeps decode as decodeDeltaSummary does.
			var e []byte
			e = protowire.AppendTag(e, num, protowire.BytesType)
			e = protowire.AppendBytes(e, b)
			var part segmeshv1.NetmapDelta
			if err = decodeDeltaSummary(e, &part); err != nil {
				break
			}
			mergeDeltaSummary(d, &part)
		default:
			err = p.skip(typ)
		}
		if err != nil {
			return err
		}
	}
}

// mergeDeltaSummary adds the summary fields of part (one field decoded) to d.
func mergeDeltaSummary(d, part *segmeshv1.NetmapDelta) {
	if part.BaseHash != "" {
		d.BaseHash = part.BaseHash
	}
	if part.Hash != "" {
		d.Hash = part.Hash
	}
	if part.Header != nil {
		d.Header = part.Header
	}
	d.UpsertedPeers = append(d.UpsertedPeers, part.UpsertedPeers...)
	d.RemovedPeers = append(d.RemovedPeers, part.RemovedPeers...)
}
