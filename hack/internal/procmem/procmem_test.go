package procmem

import (
	"os"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Mem
		wantErr bool
	}{
		{
			name: "all fields",
			in:   "Name:\tagent\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\nRssAnon:\t  512 kB\nRssFile:\t  500 kB\n",
			want: Mem{RSS: 1024 << 10, HWM: 2048 << 10, RSSAnon: 512 << 10, RSSFile: 500 << 10},
		},
		{name: "only VmRSS", in: "VmRSS:\t 4 kB\n", want: Mem{RSS: 4 << 10}},
		{name: "no VmRSS", in: "Name:\tkthreadd\n", wantErr: true},
		{name: "bad unit", in: "VmRSS:\t 4 MB\n", wantErr: true},
		{name: "bad number", in: "VmRSS:\t x kB\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Parse error = %v, want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("Parse = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestReadSelf(t *testing.T) {
	m, err := Read(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if m.RSS <= 0 || m.HWM < m.RSS {
		t.Errorf("Read(self) = %+v, want RSS > 0 and HWM >= RSS", m)
	}
}
