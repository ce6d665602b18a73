/* SPDX-License-Identifier: MIT
 *
 * Segmesh patch test, see SEGMESH.md.
 */

package device

import (
	"testing"
)

// TestStaticSharedSecret checks the segmesh patch: the device's cached X25519 key
// gives the same shared secret as the original computation, and refuses a low-order
// point the same way.
func TestStaticSharedSecret(t *testing.T) {
	dev := randDevice(t)
	defer dev.Close()
	for range 20 {
		sk, err := newPrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		pk := sk.publicKey()
		dev.staticIdentity.RLock()
		got, gotErr := dev.staticSharedSecret(pk)
		want, wantErr := dev.staticIdentity.privateKey.sharedSecret(pk)
		dev.staticIdentity.RUnlock()
		if got != want || (gotErr == nil) != (wantErr == nil) {
			t.Fatalf("staticSharedSecret = %x, %v; sharedSecret = %x, %v", got, gotErr, want, wantErr)
		}
	}
	var lowOrder NoisePublicKey // the all-zero point has order 4: the shared secret is zero
	dev.staticIdentity.RLock()
	ss, err := dev.staticSharedSecret(lowOrder)
	dev.staticIdentity.RUnlock()
	if err == nil || !isZero(ss[:]) {
		t.Fatalf("low-order point: %x, %v; want a zero secret and an error", ss, err)
	}
}
